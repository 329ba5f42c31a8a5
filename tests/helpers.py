"""Test-only pieces that the entry points load through Hydra overrides."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig

ROOT = Path(__file__).resolve().parent.parent


def cli(
    *args: str, cwd: Path, new_session: bool = False, small: bool = True, flags: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    """``python -m coco_multilabel.train [FLAGS] TINY ARGS`` on the worktree's code, from ``cwd``
    (an ``experiment=`` in ``args`` replaces TINY's ``~experiment``; ``small=False``: ARGS alone,
    as a user types them)."""
    from tests.conftest import tiny

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "coco_multilabel.train", *flags, *(tiny(*args) if small else args)],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=600, start_new_session=new_session,
    )  # fmt: skip


class WeightRecorder(L.Callback):
    """After every training epoch each process appends its epoch, phase and exact digests of the
    backbone's and the head's weights to ``<folder>/rank<r>.jsonl``: DDP ranks must agree."""

    def __init__(self, folder: str):
        self.folder = Path(folder)

    def on_train_epoch_end(self, trainer, pl_module):
        def digest(module):
            return hashlib.sha256(
                b"".join(p.detach().cpu().numpy().tobytes() for p in module.parameters())
            ).hexdigest()

        record = {"epoch": trainer.current_epoch, "phase": pl_module.phase.name,
                  "backbone": digest(pl_module.backbone), "head": digest(pl_module.head)}  # fmt: skip
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / f"rank{trainer.global_rank}.jsonl", "a") as file:
            file.write(json.dumps(record) + "\n")


class KillAtEpoch(L.Callback):
    """SIGKILL the whole process group (the run, or the sweep with its workers) when ``epoch``
    starts, once: ``marker`` records that it happened. ``job_num`` picks one job of a multirun,
    ``run_dir_name`` one run by its folder's name (a search's trial number).
    Only for subprocesses started with ``start_new_session=True``."""

    def __init__(self, epoch: int, marker: str, job_num: int | None = None, run_dir_name: str | None = None):
        self.epoch, self.marker, self.job_num, self.run_dir_name = epoch, Path(marker), job_num, run_dir_name

    def on_train_epoch_start(self, trainer, pl_module):
        if self.job_num is not None and HydraConfig.get().job.get("num") != self.job_num:
            return
        if self.run_dir_name is not None and Path(trainer.default_root_dir).name != str(self.run_dir_name):
            return
        if trainer.current_epoch == self.epoch and not self.marker.exists():
            self.marker.write_text(str(os.getpid()))
            os.killpg(os.getpgrp(), signal.SIGKILL)


class CacheRecorder(L.Callback):
    """Each process appends to ``<folder>/predict.rank<r>.jsonl`` the dataset indices of every batch
    it runs through the feature cache's builder, and to ``train.rank<r>.jsonl``, when training
    starts, which cache rows it serves and a digest of their values."""

    def __init__(self, folder: str):
        self.folder = Path(folder)

    def _append(self, name: str, trainer, record: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / f"{name}.rank{trainer.global_rank}.jsonl", "a") as file:
            file.write(json.dumps(record) + "\n")

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._append("predict", trainer, {"indices": batch["indices"].tolist()})

    def on_train_start(self, trainer, pl_module):
        import numpy as np

        features = trainer.datamodule.features.train
        values = np.asarray(features.features)[features.rows]
        digest = hashlib.sha256(np.ascontiguousarray(values).tobytes()).hexdigest()
        self._append("train", trainer, {"rows": features.rows.tolist(), "digest": digest})


class StallFirstAttempt(L.Callback):
    """Sleep ``seconds`` when training epoch ``epoch`` (0-based) starts, in a Slurm job's first
    attempt only (``SLURM_RESTART_COUNT`` unset), the last.ckpt of the epochs before it saved: a
    job that outlasts its time limit once, and trains as it would without this callback."""

    def __init__(self, epoch: int, seconds: float):
        self.epoch, self.seconds = epoch, seconds

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch and int(os.environ.get("SLURM_RESTART_COUNT", 0)) == 0:
            time.sleep(self.seconds)


class FitRecorder(L.Callback):
    """Writes ``<out>`` (JSON) at the end of training: each epoch's phase and the digests of the
    backbone's and the head's weights at its start and end; what the backbone's first forward of a
    training step saw (input memory format, autocast and its dtype); batches and optimizer steps."""

    def __init__(self, out: str):
        self.out, self.epochs, self.forward, self.batches = Path(out), [], None, 0

    @staticmethod
    def _digest(module) -> str:
        return hashlib.sha256(
            b"".join(p.detach().cpu().float().numpy().tobytes() for p in module.parameters())
        ).hexdigest()

    def on_fit_start(self, trainer, pl_module):
        self.epochs, self.forward, self.batches = [], None, 0

        def look(module, args):
            if module.training and self.forward is None:
                (inputs,) = args[:1]
                self.forward = {
                    "channels_last": inputs.dim() == 4
                    and inputs.is_contiguous(memory_format=torch.channels_last),
                    "autocast": torch.is_autocast_enabled("cpu"),
                    "autocast_dtype": str(torch.get_autocast_dtype("cpu")),
                }

        first_conv = next(m for m in pl_module.backbone.modules() if isinstance(m, torch.nn.Conv2d))
        first_conv.register_forward_pre_hook(look)

    def on_train_epoch_start(self, trainer, pl_module):
        self.epochs.append({"phase": pl_module.phase.name, "start": self._weights(pl_module)})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batches += 1

    def on_train_epoch_end(self, trainer, pl_module):
        self.epochs[-1]["end"] = self._weights(pl_module)

    def on_train_end(self, trainer, pl_module):
        record = {"epochs": self.epochs, "forward": self.forward, "batches": self.batches,
                  "global_step": trainer.global_step}  # fmt: skip
        previous = json.loads(self.out.read_text()) if self.out.is_file() else []
        self.out.write_text(json.dumps([*previous, record]))  # one record a fit: a phase is a fit

    def _weights(self, pl_module) -> dict:
        return {"backbone": self._digest(pl_module.backbone), "head": self._digest(pl_module.head)}
