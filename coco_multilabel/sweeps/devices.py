"""A machine-wide pool of devices for parallel multirun jobs: one job per GPU, never two.

Each device is a lock file; a job holds the lock of the device it trains on and the operating
system releases it when the job ends, fails or is killed, so the next waiting job starts at once.
Locks are keyed by physical id (the entries of ``CUDA_VISIBLE_DEVICES``), so two sweeps started on
the same machine share its GPUs too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from filelock import FileLock, Timeout

from coco_multilabel.errors import UserError

log = logging.getLogger(__name__)


def visible_devices() -> list[str]:
    """The GPUs this process may use, by physical id: ``CUDA_VISIBLE_DEVICES`` or all of them."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip() and d.strip() != "-1"]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def default_lock_dir() -> str:
    """Per user, out of others' reach: ``$XDG_RUNTIME_DIR`` (a 0700 folder the login made) or
    ``~/.cache/coco-multilabel``. A shared /tmp folder would let another user plant a symlink there
    that a lock file follows, or hold every device's lock."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) if runtime and Path(runtime).is_dir() else Path.home() / ".cache" / "coco-multilabel"
    return str(base / "coco-multilabel-devices")


def private_folder(folder: str | Path) -> Path:
    """``folder``, made with mode 0700 if missing; a UserError if it is a symlink, someone else's,
    or writable by others (the fix is named: another ``device_pool.lock_dir``, or chmod)."""
    folder = Path(folder).expanduser()
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        folder.mkdir(mode=0o700)
    except FileExistsError:
        pass
    info = os.lstat(folder)
    fix = "set device_pool.lock_dir to a folder of your own (default: under $XDG_RUNTIME_DIR or ~/.cache)"
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise UserError(f"device lock folder {folder} is a symlink or not a folder; not followed: {fix}")
    if info.st_uid != os.getuid():
        raise UserError(f"device lock folder {folder} belongs to user {info.st_uid}, not you: {fix}")
    if info.st_mode & 0o022:
        raise UserError(
            f"device lock folder {folder} is writable by others (mode {stat.S_IMODE(info.st_mode):o}): "
            f"chmod 700 {folder}, or {fix}"
        )
    return folder


def not_a_link(path: Path) -> Path:
    """A lock file is opened with O_CREAT|O_TRUNC, which would follow a symlink and truncate its target."""
    if path.is_symlink():
        raise UserError(f"device lock {path} is a symlink; not followed: delete it (rm {path}) and run again")
    return path


@contextlib.contextmanager
def acquire_device(ids: Sequence[str | int], lock_dir: str | Path, poll_s: float = 1.0) -> Iterator[int]:
    """Wait for a free device of ``ids``, hold it while the block runs, yield its index in ``ids``
    (the index the process's framework sees when ``ids`` are its visible devices)."""
    if not ids:
        raise ValueError("acquire_device needs at least one device id")
    lock_dir = private_folder(lock_dir)
    waited = False
    while True:
        for index, device in enumerate(ids):
            lock = FileLock(not_a_link(lock_dir / f"device-{device}.lock"))
            try:
                lock.acquire(timeout=0)
            except Timeout:
                continue
            log.info("device %s taken by process %d", device, os.getpid())
            try:
                yield index
            finally:
                lock.release()
                log.info("device %s released", device)
            return
        if not waited:
            log.info("all devices %s busy; waiting for one", list(ids))
            waited = True
        time.sleep(poll_s)
