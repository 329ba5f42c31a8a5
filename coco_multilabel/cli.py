"""What the Hydra entry points share: config resolvers and the way user errors are reported."""

from __future__ import annotations

import functools
import logging
import sys
import time
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf

from coco_multilabel.errors import UserError
from coco_multilabel.sweeps.devices import default_lock_dir, visible_devices

CONFIG_DIR = str(Path(__file__).resolve().parent / "conf")  # package data: works installed too


def run_dir_for(ckpt_path: str | None, default: str) -> str:
    """A resumed run continues in the folder of its checkpoint (``<run>/checkpoints/last.ckpt``),
    keeping its split, logs and checkpoints together; a new run gets ``default``."""
    if not ckpt_path:
        return default
    ckpt = Path(ckpt_path)
    return str(ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent)


def last_checkpoint(run_dir: str | None) -> str | None:
    """``resume=<run dir>`` continues that run from the checkpoint it saves after every epoch."""
    return str(Path(run_dir) / "checkpoints" / "last.ckpt") if run_dir else None


def config_subdir(ckpt_path: str | None) -> str:
    """Where Hydra saves a run's config: ``.hydra``, or for a resume ``.hydra/resumed/<time>``, so
    that a resume (refused, or with other options) never rewrites the config the run was made with."""
    return f".hydra/resumed/{time.strftime('%Y-%m-%d_%H-%M-%S')}" if ckpt_path else ".hydra"


def parallel_jobs(device_ids) -> int:
    """How many multirun jobs run at once on this machine: one per device of the pool (one on CPU)."""
    return len(device_ids) if device_ids is not None else max(1, len(visible_devices()))


OmegaConf.register_new_resolver("run_dir_for", run_dir_for, replace=True)
OmegaConf.register_new_resolver("last_checkpoint", last_checkpoint, replace=True)
OmegaConf.register_new_resolver("config_subdir", config_subdir, replace=True)
OmegaConf.register_new_resolver("device_lock_dir", default_lock_dir, replace=True)
OmegaConf.register_new_resolver("parallel_jobs", parallel_jobs, replace=True)


def in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def report_user_errors(main):
    """Print a UserError as one clear line and exit 2, instead of a traceback. In a multirun that
    job ends there (its result.json says why) and the other jobs go on; the sweep exits 1 at the end."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except Exception as err:
            cause = err
            while cause is not None and not isinstance(cause, UserError):
                cause = cause.__cause__  # Hydra's instantiate wraps what the target raised
            if cause is None:
                raise
            logging.getLogger(main.__module__).error("error: %s", cause)
            if in_multirun():
                return None
            sys.exit(2)

    return wrapper
