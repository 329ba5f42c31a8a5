"""Atomic file writes: a run killed at any moment leaves the old file or the new one, never half."""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import re
import shutil
import tempfile
from pathlib import Path

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from coco_multilabel.errors import UserError


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to a temporary file beside ``path``, flush it to disk, then rename it.

    Beside, not in /tmp: a rename is only atomic within one file system.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp's 0600 would survive the rename
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(f"no space left on device to write {path}; free space and run again") from err
        raise
    _fsync_dir(path.parent)
    return path


def current_umask() -> int:
    """The process's umask, read without changing it where Linux tells it (``os.umask`` sets it
    for a moment, which another thread creating a file could meet)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | Path, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, obj, **dumps_kwargs) -> Path:
    return write_text_atomic(path, json.dumps(obj, **dumps_kwargs) + "\n")


def remove_stale_temporaries(folder: str | Path) -> None:
    """A SIGKILL between mkstemp and rename leaves a ``.<name>.*.tmp``; checkpoints are big enough
    for those to fill a disk, so each save clears what a killed one left behind."""
    for stale in Path(folder).glob(".*.tmp"):
        stale.unlink(missing_ok=True)


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (a power cut could otherwise undo it); not possible everywhere."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, made atomic: ``last.ckpt`` and ``best.ckpt`` are replaced by a
    rename, so a run killed mid-save still has the previous checkpoint to resume from.

    Lightning's own writer opens the target path directly (or, through fsspec, a temporary file in
    /tmp that is then copied across file systems, without an fsync).
    """

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options}")
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        remove_stale_temporaries(Path(path).parent)
        write_bytes_atomic(path, buffer.getbuffer())


def load_data_only(path: str | Path, what: str, map_location="cpu"):
    """``torch.load`` of tensors and plain containers only (``weights_only``): a pickled object in
    a file someone passed around would run code on load. A file holding one is a UserError naming
    it and what it holds; any other failure is the caller's to word."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL [\w.]+", str(err))
        if found is None:  # no callable named: a damaged file, or not a torch file at all
            raise
        raise UserError(
            f"{what} {path} holds pickled objects, not only tensors and plain data "
            f"({found.group(0)}); loading it could run code, so it was not "
            "loaded; use a file written by coco-multilabel (or torch.save of a plain state dict)"
        ) from err


def one_line(err: BaseException) -> str:
    """The first line of an exception's message (torch's and Pillow's run over many)."""
    text = str(err)
    unpickler = re.search(r"WeightsUnpickler error:\s*([^\n]*)", text)  # torch's one useful line
    if unpickler:
        return f"not a PyTorch file, or damaged: {unpickler.group(1).strip()[:160]}"
    lines = text.strip().splitlines()
    return lines[0][:200] if lines else type(err).__name__


def check_free_space(folder: str | Path, needed: int, what: str, fix: str) -> None:
    """Say up front, in one line, when ``folder``'s disk has less than ``needed`` bytes (and 10 %)
    free for ``what``, instead of failing at 90 % of a long step; ``fix`` names the option."""
    folder = existing_parent(folder)
    free = shutil.disk_usage(folder).free
    if free < needed * 1.1:
        raise UserError(
            f"{what} needs about {human_bytes(needed)} on {folder}, which has {human_bytes(free)} free: "
            f"free some space, or {fix}"
        )


def existing_parent(folder: str | Path) -> Path:
    """``folder``, or its nearest existing parent: the disk the folder will be made on."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def disk_free(folder: str | Path) -> int:
    """Free bytes on the disk that holds (or will hold) ``folder``."""
    return shutil.disk_usage(existing_parent(folder)).free


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
