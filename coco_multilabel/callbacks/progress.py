"""What a run shows while it goes: Lightning's rich bar in a terminal, a line per epoch in the log.

Epochs are numbered from 1, counted over the whole run across the phases of its schedule (each
phase is its own ``trainer.fit`` on one Trainer, so Lightning's own "Epoch 3/3" would be 0-based and
count to the end of the phase). The bar gains an images-per-second column (:class:`ImagesPerSecond`).
"""

from __future__ import annotations

import logging
import math
import time

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar
from rich.progress import ProgressColumn
from rich.text import Text

from coco_multilabel.callbacks.best_metrics import BestMetrics
from coco_multilabel.progress import ProgressLines, duration, is_terminal

log = logging.getLogger(__name__)

WITHIN_EPOCH_GAP_S = 60.0  # a line within an epoch at most this often (and each tenth of the way)


class ImagesPerSecond(ProgressColumn):
    """Batches per second times the batch size: images (or cached feature rows) per second.

    Ours, not Lightning's ``ThroughputMonitor``: that one hands its figures to the loggers only,
    every ``log_every_n_steps`` (no column of the bar shows them), calls ``torch.cuda.synchronize``
    after every batch, and warns unless the model counts its FLOPs (``flops_per_batch``). The bar
    already measures its speed; this column only multiplies it by the batch size.
    """

    def __init__(self, trainer):
        super().__init__()
        self.trainer = trainer

    def render(self, task) -> Text:
        hparams = getattr(getattr(self.trainer, "datamodule", None), "hparams", {})
        if task.speed is None or "batch_size" not in hparams:
            return Text("")
        return Text(f"{task.speed * hparams['batch_size']:.1f} img/s", style="grey70")


class ThroughputProgressBar(RichProgressBar):
    """In a terminal only: written to a file a bar shows just its last frame (:class:`RunProgress`
    writes lines there instead)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not is_terminal():
            self.disable()

    def configure_columns(self, trainer) -> list:
        return [*super().configure_columns(trainer), ImagesPerSecond(trainer)]

    def _get_train_description(self, current_epoch: int) -> str:
        run = next((c for c in self.trainer.callbacks if isinstance(c, RunProgress)), None)
        if run is None:
            description = f"epoch {current_epoch + 1}/{self.trainer.max_epochs}"
        else:
            description = run.where(self.trainer, self.trainer.lightning_module)
        # as Lightning pads it: the bar does not jump when "Validation" replaces it
        return f"{description:{len(self.validation_description)}}"


class PredictProgress(L.Callback):
    """Outside a terminal, a line every 30 s or 10 % of a ``trainer.predict`` (the feature cache
    build, submit, report), to the log; in a terminal the bar shows it."""

    def __init__(self):
        self.predicting: ProgressLines | None = None

    def on_predict_start(self, trainer, pl_module):
        self.predicting = None
        if not trainer.is_global_zero or is_terminal():
            return
        loaders = trainer.predict_dataloaders
        loaders = loaders if isinstance(loaders, list | tuple) else [loaders]
        total = sum(len(getattr(loader, "dataset", ())) for loader in loaders)
        if total:
            self.predicting = ProgressLines(getattr(pl_module, "progress_description", "predicting"), total)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if self.predicting is not None:  # rank 0's share, times the ranks
            self.predicting.advance(len(batch["indices"]) * trainer.world_size)

    def on_predict_end(self, trainer, pl_module):
        if self.predicting is not None:
            self.predicting.finish()
            self.predicting = None


class RunProgress(PredictProgress):
    """A line per epoch: phase, epoch k/n over the run, train loss, the val objective and the best
    so far, images per second, elapsed time (over resumes, from the run's budget) and the time left;
    within an epoch that runs for minutes, a line each tenth of it, at most once a minute; and the
    lines of :class:`PredictProgress` while the feature cache is built.

    The lines go to the log, which Hydra writes to stdout and the run's ``<job>.log``. In a terminal,
    where the bar shows all this, the epoch lines go to the log files only.
    """

    def __init__(self, phases: list | None = None, elapsed=None):
        """``phases``: the run's schedule (None: one phase of ``trainer.max_epochs``)."""
        super().__init__()
        self.epochs = sum(p.epochs for p in phases) if phases else None  # over the run
        self.running = [p.name for p in phases if p.epochs] if phases else []  # the phases that train
        self.elapsed = elapsed  # () -> seconds the run has spent, over resumes; None: this process
        self.started = time.monotonic()
        self.epoch_times: dict[int, list[float]] = {}  # phase index -> its epochs' durations here
        self.epoch_start = self.train_end = None
        self.images = 0
        self.within: ProgressLines | None = None  # lines within a long epoch

    def where(self, trainer, pl_module) -> str:
        """``epoch 3/17 (probe, phase 1/2)``: epoch k of n over the run, from 1, and its phase."""
        total = self.epochs if self.epochs is not None else trainer.max_epochs
        text = f"epoch {trainer.current_epoch + 1}/{total}"
        phase = getattr(getattr(pl_module, "phase", None), "name", None)
        if phase not in self.running:
            return text
        if len(self.running) == 1:
            return f"{text} ({phase})"
        return f"{text} ({phase}, phase {self.running.index(phase) + 1}/{len(self.running)})"

    # --- training ---------------------------------------------------------------------------------

    def on_train_epoch_start(self, trainer, pl_module):
        self.epoch_start, self.train_end, self.images = time.monotonic(), None, 0
        self.within = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        images = len(batch["targets"]) * trainer.world_size
        self.images += images
        batches = trainer.num_training_batches
        if self.within is None and trainer.is_global_zero and not is_terminal() and math.isfinite(batches):
            # a long epoch (full fine-tuning of 65k images) also says how far it got; epochs of
            # seconds print only their epoch line
            self.within = ProgressLines(
                self.where(trainer, pl_module), int(batches * images), every_s=math.inf,
                min_gap_s=WITHIN_EPOCH_GAP_S, started=self.epoch_start,
            )  # fmt: skip
        if self.within is not None:
            self.within.advance(images)

    def on_validation_start(self, trainer, pl_module):
        if not trainer.sanity_checking and self.epoch_start is not None and self.train_end is None:
            self.train_end = time.monotonic()

    def on_train_epoch_end(self, trainer, pl_module):
        if not trainer.is_global_zero or self.epoch_start is None:
            return
        now = time.monotonic()
        phase = getattr(pl_module, "phase_index", 0)
        self.epoch_times.setdefault(phase, []).append(now - self.epoch_start)
        line = self.epoch_line(trainer, pl_module, now)
        if is_terminal():
            log_to_files(log, line)  # the bar shows it on the terminal
        else:
            log.info(line)

    def epoch_line(self, trainer, pl_module, now: float) -> str:
        metrics = trainer.callback_metrics
        parts = [self.where(trainer, pl_module)]
        loss = metrics.get("train/loss_epoch", metrics.get("train/loss"))
        if loss is not None:
            parts.append(f"train loss {float(loss):.4f}")
        parts += self.objective(trainer)
        training = (self.train_end or now) - self.epoch_start
        if self.images and training > 0:
            parts.append(f"{self.images / training:,.1f} images/s")
        elapsed = self.elapsed() if self.elapsed else now - self.started
        parts.append(f"elapsed {duration(elapsed)}")
        if (left := self.time_left(trainer, pl_module)) is not None:
            parts.append(left)
        return ", ".join(parts)

    def objective(self, trainer) -> list[str]:
        """``val/macro_f1_xfit 0.4312 (best 0.4400, epoch 3)``; nothing without a validation."""
        best = next((c for c in trainer.callbacks if isinstance(c, BestMetrics)), None)
        monitor = best.monitor if best else getattr(trainer.checkpoint_callback, "monitor", None)
        value = trainer.callback_metrics.get(monitor) if monitor else None
        if value is None:
            return []
        text = f"{monitor} {float(value):.4f}"
        if best is not None and best.best is not None:
            if best.best.get("best_epoch") == trainer.current_epoch + 1:
                text += " (best so far)"
            else:
                text += f" (best {best.best[monitor]:.4f}, epoch {best.best.get('best_epoch')})"
        return [text]

    def time_left(self, trainer, pl_module) -> str | None:
        """The epochs left in this phase at its mean epoch time here: the run's ETA in its last
        phase; before that only the phase's (a later phase may run at another speed)."""
        phase = getattr(pl_module, "phase_index", 0)
        times = self.epoch_times.get(phase)
        phase_end = trainer.max_epochs
        if not times or phase_end is None:
            return None
        left = max(0, phase_end - trainer.current_epoch - 1) * sum(times) / len(times)
        last_phase = self.epochs is None or phase_end >= self.epochs
        return f"ETA {duration(left)}" if last_phase else f"phase ends in {duration(left)}"


def log_to_files(logger: logging.Logger, message: str) -> None:
    """``message`` at INFO to the file handlers ``logger``'s records reach (Hydra's ``<job>.log``),
    not to the console."""
    if not logger.isEnabledFor(logging.INFO):
        return
    record = logger.makeRecord(logger.name, logging.INFO, __file__, 0, message, None, None)
    current: logging.Logger | None = logger
    while current is not None:
        for handler in current.handlers:
            if isinstance(handler, logging.FileHandler) and record.levelno >= handler.level:
                handler.handle(record)
        current = current.parent if current.propagate else None
