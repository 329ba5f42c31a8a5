"""Unpacking the challenge archive (``make data ZIP=ms-coco.zip``).

The archive may hold the data root
itself (``images/``, ``labels/``) or one folder around it (``ms-coco/images/...``); either way the
destination ends up holding ``images/`` and ``labels/``. Everything is unpacked into a temporary
folder beside the destination and renamed into place at the end, so an interrupted or failed
unpack never leaves a half-filled data root, and an existing one is never overwritten.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

from coco_multilabel.errors import UserError

log = logging.getLogger(__name__)

IGNORED = ("__MACOSX/",)  # what macOS's archiver adds beside the real files


def data_prefix(names: list[str]) -> str:
    """The folder inside the archive that holds ``images/``: ``""`` or e.g. ``"ms-coco/"``."""
    prefixes = set()
    for name in names:
        parts = PurePosixPath(name).parts
        if "images" in parts[:-1]:
            prefixes.add("".join(f"{p}/" for p in parts[: parts.index("images")]))
    if not prefixes:
        raise UserError("the archive holds no images/ folder: is it the challenge's ms-coco.zip?")
    if len(prefixes) > 1:
        raise UserError(f"the archive holds several images/ folders ({', '.join(sorted(prefixes))})")
    return prefixes.pop()


def unpack(archive: str | Path, destination: str | Path, progress: bool = True) -> Path:
    """Unpack the data root of ``archive`` to ``destination``, which must not exist yet."""
    archive, destination = Path(archive), Path(destination)
    if not archive.is_file():
        raise UserError(
            f"{archive} does not exist; download ms-coco.zip and pass its path: make data ZIP=..."
        )
    if destination.exists() and any(destination.iterdir()):
        raise UserError(
            f"{destination} already holds files; delete it first, or unpack elsewhere with DATA=..."
        )
    try:
        with zipfile.ZipFile(archive) as zf:
            members = [m for m in zf.infolist() if not m.filename.startswith(IGNORED)]
            prefix = data_prefix([m.filename for m in members])
            members = [m for m in members if m.filename.startswith(prefix) and m.filename != prefix]
            destination.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_staging(destination)
            staging = Path(
                tempfile.mkdtemp(
                    dir=destination.parent, prefix=f".{destination.name}.{os.getpid()}.", suffix=".tmp"
                )
            )
            try:
                _extract(zf, members, prefix, staging, progress)
                if destination.exists():
                    destination.rmdir()  # empty, checked above
                os.replace(staging, destination)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, zlib.error) as err:
        raise UserError(f"{archive} is not a complete zip archive ({err}); download it again") from err
    log.info("unpacked %d files of %s to %s", sum(not m.is_dir() for m in members), archive, destination)
    return destination


def remove_stale_staging(destination: Path) -> None:
    """An unpack killed mid-way (SIGKILL, a power cut) leaves its staging folder, as big as the
    data: the next unpack removes those of processes that are gone, never a running one's."""
    for stale in destination.parent.glob(f".{destination.name}.*.tmp"):
        pid = stale.name.removeprefix(f".{destination.name}.").split(".")[0]
        if pid.isdigit() and not _alive(int(pid)):
            log.info("removing %s, left by an unpack that was killed", stale)
            shutil.rmtree(stale, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _extract(zf: zipfile.ZipFile, members, prefix: str, staging: Path, progress: bool) -> None:
    columns = (TextColumn("unpacking"), BarColumn(), DownloadColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not progress, transient=True) as bar:
        task = bar.add_task("unpack", total=sum(m.file_size for m in members))
        for member in members:
            relative = PurePosixPath(member.filename[len(prefix) :])
            if relative.is_absolute() or ".." in relative.parts:
                raise UserError(
                    f"the archive holds an unsafe path {member.filename!r}; it is not the challenge's"
                )
            target = staging.joinpath(*relative.parts)
            if member.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(member) as source, open(target, "wb") as sink:  # checks each file's CRC
                shutil.copyfileobj(source, sink, 1 << 20)
            bar.advance(task, member.file_size)
