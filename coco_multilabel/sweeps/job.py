"""One job of a Hydra multirun: a device of its own, skip when finished, resume when interrupted.

Every run (single or multirun) leaves ``result.json`` in its folder: its overrides, the config it
ran with, status, device, best val metrics, epochs, wall time, best checkpoint and its resumes. The
sweep summary is built from these files, and a relaunched multirun reads them: a finished job is
skipped when its config is still the one it ran with (else the relaunch is refused, naming what
changed), an unfinished job resumes from its ``checkpoints/last.ckpt`` with its own config.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from lightning.fabric.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from coco_multilabel.cli import in_multirun, run_dir_for
from coco_multilabel.errors import UserError
from coco_multilabel.io import write_json_atomic
from coco_multilabel.sweeps.devices import acquire_device, visible_devices
from coco_multilabel.sweeps.slurm import time_limit_outcome
from coco_multilabel.training.resume import (
    fixed_changes,
    group_choices,
    is_mutable,
    resumed_config,
    saved_config,
    settings,
)

log = logging.getLogger(__name__)

RESULT = "result.json"


def run_job(
    cfg: DictConfig, train: Callable[[DictConfig], dict], check: Callable | None = None
) -> float | None:
    """Run ``train(cfg)`` and record it in ``result.json``; return the best score (the objective).
    A resume continues the run with its own config (``training/resume.py``) and record: its
    original overrides, each resume, the wall time of every segment. ``check(cfg)`` runs before
    anything is written: a command it refuses leaves an existing record untouched."""
    run_dir = Path(cfg.run_dir)
    overrides = task_overrides()
    previous = read_result(run_dir)
    record = {"status": "running", "overrides": overrides}
    try:
        if in_multirun():
            check_one_device(cfg, launcher_target())
            check_job_folder(run_dir, overrides, OmegaConf.to_container(cfg))
            if previous and previous["status"] == "done":
                log.info("%s finished before (best %s); skipped", run_dir, previous.get("best_score"))
                return previous.get("best_score")
            last = run_dir / "checkpoints" / "last.ckpt"
            if not cfg.ckpt_path and last.is_file():
                log.info("resuming the interrupted job from %s", last)
                cfg.ckpt_path = str(last)
        if cfg.ckpt_path:
            source = Path(run_dir_for(cfg.ckpt_path, str(run_dir)))
            cfg = resumed_config(cfg, source, read_result(source), overrides)
        if check is not None:
            check(cfg)
    except UserError as err:
        if previous is None:
            _write(run_dir, {**record, "status": "failed", "error": f"UserError: {err}"})
        raise
    record.update(config=OmegaConf.to_container(cfg), choices=group_choices(), resumed_from=cfg.ckpt_path)
    if cfg.ckpt_path and previous:  # the run recorded here goes on: one record across its segments
        record = resumed_record(record, previous, cfg.ckpt_path)
    with job_device(cfg) as device:  # a job waiting for a device shows as pending in the summary
        start = time.perf_counter()
        record.update(device=device, host=socket.gethostname(), pid=os.getpid())
        record.setdefault("started", utc_now())
        _write(run_dir, record)
        try:
            summary = train(cfg)
        except BaseException as err:
            cut, instead = time_limit_outcome(err)  # Slurm's time limit: requeued, or no requeue left
            _write(run_dir, {**record, "status": "failed", "error": f"{type(err).__name__}: {err}", **cut})
            if instead is not None:
                raise instead from err
            raise
    record.update(summary, status="done", ended=utc_now())
    record.setdefault("wall_s", round(time.perf_counter() - start, 1))  # train() may count earlier segments
    _write(run_dir, record)
    return summary["best_score"]


def resumed_record(record: dict, previous: dict, ckpt_path: str) -> dict:
    """This launch's record for a run that ``previous`` recorded: the run's first overrides,
    options and start, and one more resume (when, its overrides, after which epoch)."""
    from coco_multilabel.models.checkpoints import epochs_done  # the model code only when resuming

    resume = {"started": utc_now(), "overrides": record["overrides"], "after_epoch": epochs_done(ckpt_path)}
    kept = {k: previous[k] for k in ("overrides", "choices", "started") if previous.get(k) is not None}
    record = {**record, **kept, "resumes": [*previous.get("resumes", []), resume]}
    if "choices" not in kept:  # a record of an older version: the run's options are in its .hydra/
        del record["choices"]
    return record


def check_job_folder(run_dir: Path, overrides: list[str], config: dict | None = None) -> dict | None:
    """The folder's previous record, or a UserError when it belongs to a job with other overrides
    or, for a job that holds results (done, or a checkpoint to resume), another config."""
    previous = read_result(run_dir)
    if previous and job_identity(previous.get("overrides", [])) != job_identity(overrides):
        raise UserError(
            f"{run_dir / RESULT} belongs to a job with overrides {previous.get('overrides')}, not "
            f"{overrides}: this sweep dir holds another sweep; pass a new hydra.sweep.dir"
        )
    if config is not None and (change := config_change(run_dir, previous, config)):
        raise UserError(f"{run_dir} ran with {change}{RERUN}")
    return previous


RERUN = (
    ": a job is finished only for the config it ran with; to run the grid with today's config, "
    "pass a new hydra.sweep.dir (make cv: DIR=<new>); to finish this one, restore the config it ran with"
)


def config_change(run_dir: Path, previous: dict | None, config: dict) -> str | None:
    """``model.dropout=0.2, which the config now sets to model.dropout=0.5`` when a job that holds
    results composes to another config today (a config file edited, the project updated)."""
    holds_results = previous and (
        previous.get("status") == "done" or (Path(run_dir) / "checkpoints" / "last.ckpt").is_file()
    )
    found = saved_config(run_dir, previous) if holds_results else None
    if found is None or not (keys := fixed_changes(found[0], config)):
        return None
    return f"{settings(keys, found[0])}, which the config now sets to {settings(keys, config)}"


def job_identity(overrides: list[str]) -> list[str]:
    """The overrides that set a job apart in its sweep; those of where and how it runs aside."""
    keys = [o.lstrip("~+").partition("=")[0] for o in overrides]
    return sorted(
        o for o, k in zip(overrides, keys, strict=True) if not (k.startswith("hydra") or is_mutable(k))
    )


def check_one_device(cfg: DictConfig, launcher: str = "") -> None:
    """Lightning's DDP re-launches the script per device, which inside a multirun on this machine
    re-launches the whole sweep: local multirun jobs therefore train on one device each. On SLURM
    (a submitit ``launcher``) the scheduler starts one task per GPU and Lightning joins them
    (``hydra/launcher=slurm_ddp``), so a job may span GPUs and nodes; it must then name its GPUs."""
    strategy = str(cfg.trainer.get("strategy", "auto"))
    if "submitit" in launcher:
        devices = cfg.trainer.devices
        if "ddp" in strategy and not (isinstance(devices, int) and devices > 0):
            raise UserError(
                f"trainer.devices={devices}: on SLURM a DDP job starts one task per GPU, so name how many "
                "GPUs each node gives it, e.g. trainer.devices=4 (hydra/launcher=slurm_ddp follows it)"
            )
        return
    if "ddp" in strategy or str(cfg.trainer.devices) not in ("1", "auto"):
        raise UserError(
            f"a multirun job trains on one device, but trainer.strategy={strategy} "
            f"trainer.devices={cfg.trainer.devices}: drop trainer=ddp (the sweep puts one job on "
            "each GPU), run trainer=ddp as a single run without -m, or on SLURM use hydra/launcher=slurm_ddp"
        )


@contextlib.contextmanager
def job_device(cfg: DictConfig) -> Iterator[str | None]:
    """A multirun job launched on this machine holds one device of ``cfg.device_pool`` while it
    trains; single runs, and jobs that a scheduler such as SLURM placed, use what they were given."""
    pool = cfg.get("device_pool")
    if not in_multirun() or not pool or "submitit" in launcher_target():
        yield None
        return
    keys, indices = pool_devices(pool.ids)
    if not keys:  # no GPU: jobs share the CPU
        yield None
        return
    with acquire_device(keys, pool.lock_dir, pool.poll_s) as position:
        if uses_gpu(cfg):
            cfg.trainer.devices = [indices[position]]
        yield keys[position]


def launcher_target() -> str:
    """The Hydra launcher running this job (``...SlurmLauncher`` on SLURM), or "" outside Hydra."""
    return HydraConfig.get().launcher.get("_target_", "") if HydraConfig.initialized() else ""


def pool_devices(ids) -> tuple[list[str], list[int]]:
    """Lock keys (physical ids, shared by every process on the machine) and the CUDA indices this
    process sees for ``ids`` (``device_pool.ids``; null: every visible GPU)."""
    visible = visible_devices()
    indices = [int(i) for i in ids] if ids is not None else list(range(len(visible)))
    keys = [visible[i] if i < len(visible) else str(i) for i in indices]
    return keys, indices


def uses_gpu(cfg: DictConfig) -> bool:
    accelerator = str(cfg.trainer.accelerator)
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def task_overrides() -> list[str]:
    """The command-line overrides of this job: what sets it apart in its sweep."""
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def read_result(run_dir: str | Path) -> dict | None:
    path = Path(run_dir) / RESULT
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON ({err}); delete it to rerun that job") from err


def _write(run_dir: Path, record: dict) -> None:
    if rank_zero_only.rank == 0:  # DDP: the other processes run the same job
        write_json_atomic(run_dir / RESULT, record, indent=1)


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")
