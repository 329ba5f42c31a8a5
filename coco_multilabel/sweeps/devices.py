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
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from filelock import FileLock, Timeout

log = logging.getLogger(__name__)


def visible_devices() -> list[str]:
    """The GPUs this process may use, by physical id: ``CUDA_VISIBLE_DEVICES`` or all of them."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip() and d.strip() != "-1"]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


@contextlib.contextmanager
def acquire_device(ids: Sequence[str | int], lock_dir: str | Path, poll_s: float = 1.0) -> Iterator[int]:
    """Wait for a free device of ``ids``, hold it while the block runs, yield its index in ``ids``
    (the index the process's framework sees when ``ids`` are its visible devices)."""
    if not ids:
        raise ValueError("acquire_device needs at least one device id")
    lock_dir = Path(lock_dir)
    lock_dir.mkdir(parents=True, exist_ok=True)
    waited = False
    while True:
        for index, device in enumerate(ids):
            lock = FileLock(lock_dir / f"device-{device}.lock")
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
