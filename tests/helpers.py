"""Test-only pieces that the entry points load through Hydra overrides."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import lightning as L
from hydra.core.hydra_config import HydraConfig


class KillAtEpoch(L.Callback):
    """SIGKILL the whole process group (the run, or the sweep with its workers) when ``epoch``
    starts, once: ``marker`` records that it happened. ``job_num`` picks one job of a multirun.
    Only for subprocesses started with ``start_new_session=True``."""

    def __init__(self, epoch: int, marker: str, job_num: int | None = None):
        self.epoch, self.marker, self.job_num = epoch, Path(marker), job_num

    def on_train_epoch_start(self, trainer, pl_module):
        if self.job_num is not None and HydraConfig.get().job.get("num") != self.job_num:
            return
        if trainer.current_epoch == self.epoch and not self.marker.exists():
            self.marker.write_text(str(os.getpid()))
            os.killpg(os.getpgrp(), signal.SIGKILL)
