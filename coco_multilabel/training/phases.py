"""Run a schedule: one ``trainer.fit`` per phase, on one Trainer, so epochs, steps, loggers and the
best checkpoint run on across phases while each phase builds its own optimizer and schedule."""

from __future__ import annotations

import contextlib
import logging
import warnings

import lightning as L

from coco_multilabel.callbacks.budget import RunBudget
from coco_multilabel.models.checkpoints import read_checkpoint
from coco_multilabel.progress import plural
from coco_multilabel.training.cache_build import build_feature_cache
from coco_multilabel.training.schedule import INPUTS, TRAINS, Phase, phase_ends, resume_phase

log = logging.getLogger(__name__)


def fit_phases(
    trainer: L.Trainer, model, datamodule, phases: list[Phase], ckpt_path: str | None, budget: RunBudget
) -> None:
    """Fit each phase in turn; a run resumed from ``ckpt_path`` continues in the phase and epoch
    where it stopped (the first fit restores it, the later ones go on from there)."""
    start = resume_phase(read_checkpoint(ckpt_path).get("phase") if ckpt_path else None, phases, ckpt_path)
    ends = phase_ends(phases)
    cached = None  # the feature cache's rows of the split, once a phase reads them
    for index in range(start, len(phases)):
        phase, resuming = phases[index], ckpt_path is not None and index == start
        if not phase.epochs and not resuming:
            continue
        log.info(
            "phase %d of %d, %s: %s (%s of %d) training %s, on %s",
            index + 1, len(phases), phase.name, plural(phase.epochs, "epoch"),
            epoch_range(ends[index] - phase.epochs + 1, ends[index]), ends[-1], TRAINS[phase.train],
            INPUTS[phase.inputs].split(",")[0],
        )  # fmt: skip
        model.set_phase(phase, index)
        if phase.inputs == "cache" and cached is None:  # built (or found) now, by the trainer, where
            cached = build_feature_cache(trainer, model, datamodule)  # the model runs: a step of its own
        datamodule.serve(cached if phase.inputs == "cache" else None)
        trainer.fit_loop.max_epochs = ends[index]
        with expected_warnings(phase, continuing=index > start or resuming):
            trainer.fit(
                model, datamodule=datamodule, ckpt_path=ckpt_path if resuming else None, weights_only=True
            )
        if trainer.interrupted or budget.exhausted() or trainer.should_stop:  # a callback ended the run
            break


def epoch_range(first: int, last: int) -> str:
    return f"epoch {last}" if first == last else f"epochs {first} to {last}"


@contextlib.contextmanager
def expected_warnings(phase: Phase, continuing: bool):
    """Silence, for this fit only, what Lightning warns about on purpose here:

    - "Found N module(s) in eval mode": a phase that freezes part of the backbone keeps that part
      in eval mode (the phase line says so);
    - "Checkpoint directory ... exists and is not empty": a later phase, or a resume, saves into
      the run's own checkpoints folder. A new run pointed at another run's folder still hears it.
    """
    with warnings.catch_warnings():
        if phase.train != "all":
            warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
        if continuing:
            warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
        yield
