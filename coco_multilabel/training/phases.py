"""Run a schedule: one ``trainer.fit`` per phase, on one Trainer, so epochs, steps, loggers and the
best checkpoint run on across phases while each phase builds its own optimizer and schedule."""

from __future__ import annotations

import logging

import lightning as L

from coco_multilabel.callbacks.budget import RunBudget
from coco_multilabel.models.checkpoints import read_checkpoint
from coco_multilabel.training.cache_build import ensure_feature_cache
from coco_multilabel.training.schedule import INPUTS, TRAINS, Phase, phase_ends, resume_phase

log = logging.getLogger(__name__)


def fit_phases(
    trainer: L.Trainer, model, datamodule, phases: list[Phase], ckpt_path: str | None, budget: RunBudget
) -> None:
    """Fit each phase in turn; a run resumed from ``ckpt_path`` continues in the phase and epoch
    where it stopped (the first fit restores it, the later ones go on from there)."""
    start = resume_phase(read_checkpoint(ckpt_path).get("phase") if ckpt_path else None, phases, ckpt_path)
    ends = phase_ends(phases)
    for index in range(start, len(phases)):
        phase, resuming = phases[index], ckpt_path is not None and index == start
        if not phase.epochs and not resuming:
            continue
        log.info(
            "phase %d of %d, %s: %d epochs training %s, on %s",
            index + 1, len(phases), phase.name, phase.epochs, TRAINS[phase.train].split(";")[0],
            INPUTS[phase.inputs].split(",")[0],
        )  # fmt: skip
        model.set_phase(phase, index)
        if phase.inputs == "cache":  # built (or found) now, by the trainer, where the model runs
            ensure_feature_cache(trainer, model, datamodule)
        datamodule.serve(phase.inputs)
        trainer.fit_loop.max_epochs = ends[index]
        trainer.fit(
            model, datamodule=datamodule, ckpt_path=ckpt_path if resuming else None, weights_only=True
        )
        if trainer.interrupted or budget.exhausted() or trainer.should_stop:  # a callback ended the run
            break
