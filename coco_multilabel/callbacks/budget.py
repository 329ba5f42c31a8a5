"""``trainer.max_time`` as the whole run's budget: every phase, the feature cache build included.

Lightning's own timer starts again at every ``fit``, and a run of several phases is several fits;
this one counts from the start of ``train()``, keeps what was spent in the checkpoint, and gives a
resumed run what is left of it (saying so). An epoch the budget cuts short is recorded as such.
"""

from __future__ import annotations

import logging
import time

import lightning as L

log = logging.getLogger(__name__)


def parse_duration(value) -> float | None:
    """Seconds of ``DD:HH:MM:SS``, ``{days, hours, minutes, seconds}`` or a number; None: no budget."""
    if value is None:
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        days, hours, minutes, seconds = (int(part) for part in value.split(":"))
        return float(((days * 24 + hours) * 60 + minutes) * 60 + seconds)
    units = {"days": 86400, "hours": 3600, "minutes": 60, "seconds": 1}
    return float(sum(value.get(unit, 0) * seconds for unit, seconds in units.items()))


class RunBudget(L.Callback):
    def __init__(self, seconds: float | None, started: float | None = None):
        self.seconds = seconds
        self.started = time.monotonic() if started is None else started
        self.spent_before = 0.0  # by the run this one resumes
        self.cut: dict | None = None  # the epoch the budget cut short: {epoch (from 1), batches, of}

    def elapsed(self) -> float:
        return self.spent_before + time.monotonic() - self.started

    def exhausted(self) -> bool:
        return self.seconds is not None and self.elapsed() >= self.seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.seconds is None or not trainer.strategy.broadcast(self.exhausted()):  # rank 0's clock
            return
        trainer.should_stop = True
        if batch_idx + 1 < trainer.num_training_batches:
            self.cut = {
                "epoch": trainer.current_epoch + 1,
                "batches": batch_idx + 1,
                "of": trainer.num_training_batches,
            }
            log.info(
                "trainer.max_time reached %d of %d batches into epoch %d: that epoch is cut short",
                batch_idx + 1, trainer.num_training_batches, trainer.current_epoch + 1,
            )  # fmt: skip

    def state_dict(self) -> dict:
        return {"elapsed": self.elapsed(), "cut": self.cut}

    def load_state_dict(self, state_dict: dict) -> None:
        self.spent_before, self.cut = state_dict["elapsed"], state_dict.get("cut")
        if self.seconds is not None:
            log.info(
                "resumed: the run had spent %.0f s of its %.0f s budget (trainer.max_time); %.0f s are left",
                self.spent_before, self.seconds, max(0.0, self.seconds - self.elapsed()),
            )  # fmt: skip
