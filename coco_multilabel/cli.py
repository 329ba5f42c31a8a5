"""What the Hydra entry points share: config resolvers and the way user errors are reported."""

from __future__ import annotations

import functools
import logging
import os
import sys
import time
import traceback
from importlib import resources
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf

from coco_multilabel.errors import UserError
from coco_multilabel.io import one_line, write_text_atomic
from coco_multilabel.library_messages import quiet_library_messages
from coco_multilabel.sweeps.devices import default_lock_dir, visible_devices
from coco_multilabel.sweeps.slurm import end_if_requeued, requeue_signal_delay
from coco_multilabel.training.precision import device_precision, eval_precision_of


def config_dir() -> str:
    """The folder of the Hydra configs: the repository's ``conf/``, imported as the package
    ``coco_multilabel.conf`` (a wheel carries it inside, an editable install maps it)."""
    try:
        return str(resources.files("coco_multilabel.conf"))
    except (
        ModuleNotFoundError
    ):  # a clone run with PYTHONPATH=<clone>, not installed: conf/ beside the package
        return str(Path(__file__).resolve().parent.parent / "conf")


CONFIG_DIR = config_dir()


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


def config_subdir(output_dir: str) -> str:
    """Where Hydra saves a launch's config: ``.hydra``, or ``.hydra/resumed/<time>`` when the folder
    already holds a run's: a resume or a relaunched sweep (refused, or with other options) never
    rewrites the config the run was made with."""
    if (Path(output_dir) / ".hydra" / "config.yaml").is_file():
        return f".hydra/resumed/{time.strftime('%Y-%m-%d_%H-%M-%S')}"
    return ".hydra"


def parallel_jobs(device_ids) -> int:
    """How many multirun jobs run at once on this machine: one per device of the pool (one on CPU)."""
    return len(device_ids) if device_ids is not None else max(1, len(visible_devices()))


OmegaConf.register_new_resolver("run_dir_for", run_dir_for, replace=True)
OmegaConf.register_new_resolver("last_checkpoint", last_checkpoint, replace=True)
OmegaConf.register_new_resolver("config_subdir", config_subdir, replace=True)
OmegaConf.register_new_resolver("device_lock_dir", default_lock_dir, replace=True)
OmegaConf.register_new_resolver("parallel_jobs", parallel_jobs, replace=True)
OmegaConf.register_new_resolver("device_precision", device_precision, replace=True)
OmegaConf.register_new_resolver("eval_precision_of", eval_precision_of, replace=True)
OmegaConf.register_new_resolver("requeue_signal_delay", requeue_signal_delay, replace=True)
quiet_library_messages()  # every entry point imports this module


def in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def report_user_errors(main):
    """Print a UserError as one clear line and exit 2, instead of a traceback; any other exception
    (a bug) as one line naming a log file that holds its traceback, exit 1. In a multirun that job
    ends there (its result.json says why) and the other jobs go on; the sweep exits 1 at the end."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except Exception as err:
            end_if_requeued(err)  # on Slurm: requeued at its time limit, this attempt's end is no error
            cause = err
            while cause is not None and not isinstance(cause, UserError):
                cause = cause.__cause__  # Hydra's instantiate wraps what the target raised
            log = logging.getLogger(main.__module__)
            if cause is not None:
                log.error("error: %s", cause)
                code = 2
            else:
                log.error(
                    "internal error: %s: %s; not caused by your input, please report it with the full "
                    "traceback in %s", type(err).__name__, one_line(err), write_crash_log(main.__module__),
                )  # fmt: skip
                code = 1
            if in_multirun():
                return None
            sys.exit(code)

    return wrapper


def crash_log_dir() -> Path:
    """``$XDG_CACHE_HOME/coco-multilabel/logs`` (``~/.cache/...``): found again after the terminal closes."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "coco-multilabel" / "logs"


def write_crash_log(entry_point: str) -> str:
    """The traceback being handled, in a new file; its path (or the traceback itself when no file
    can be written: the disk may be full)."""
    text = f"{' '.join(sys.argv)}\n\n{traceback.format_exc()}"
    name = f"{entry_point.rpartition('.')[2]}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    try:
        return str(write_text_atomic(crash_log_dir() / name, text))
    except Exception:
        return f"(no log file could be written)\n{text}"
