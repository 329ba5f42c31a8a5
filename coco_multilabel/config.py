"""What the Hydra entry points share: config resolvers and the way user errors are reported."""

from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path

from omegaconf import OmegaConf

from coco_multilabel.errors import UserError

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def run_dir_for(ckpt_path: str | None, default: str) -> str:
    """A resumed run continues in the folder of its checkpoint (``<run>/checkpoints/last.ckpt``),
    keeping its split, logs and checkpoints together; a new run gets ``default``."""
    if not ckpt_path:
        return default
    ckpt = Path(ckpt_path)
    return str(ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent)


OmegaConf.register_new_resolver("run_dir_for", run_dir_for, replace=True)


def report_user_errors(main):
    """Print a UserError as one clear line and exit 2, instead of a traceback."""

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
            sys.exit(2)

    return wrapper
