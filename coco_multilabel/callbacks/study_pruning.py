"""A search trial's link to its study (``make search``): the val objective after every epoch goes to
the Optuna trial, and the study's pruner may end the run there.

Like optuna-integration's ``PyTorchLightningPruningCallback``, but the run ends as a finished one
(``trainer.should_stop``, which also ends the later phases of its schedule), so that the pruned
epoch's checkpoints and the run's ``result.json`` are written as usual; the trial's worker then
records it as pruned. The trial is opened from the study's journal: the run is a process of its own.
"""

from __future__ import annotations

import logging

import lightning as L

from coco_multilabel.sweeps.study import open_trial

log = logging.getLogger(__name__)


class StudyPruning(L.Callback):
    def __init__(self, study_dir: str, trial: int):
        self.study_dir, self.number = study_dir, trial
        self.trial = None

    def setup(self, trainer, pl_module, stage):
        if self.trial is None and trainer.is_global_zero:
            self.trial = open_trial(self.study_dir, self.number)

    def on_validation_end(self, trainer, pl_module):
        """After the checkpoint callbacks have read the metrics they keep; steps are epochs from 1."""
        if trainer.sanity_checking or self.trial is None or trainer.checkpoint_callback is None:
            return
        monitor = trainer.checkpoint_callback.monitor
        value = trainer.callback_metrics.get(monitor)
        if value is None:
            return
        epoch = trainer.current_epoch + 1
        self.trial.report(float(value), step=epoch)
        if self.trial.should_prune():
            self.trial.set_user_attr("pruned_at_epoch", epoch)
            trainer.should_stop = True
            log.info(
                "trial %d pruned by the study's pruner after epoch %d, at %s = %.4f",
                self.number, epoch, monitor, float(value),
            )  # fmt: skip
