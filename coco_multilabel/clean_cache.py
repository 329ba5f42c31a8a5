"""Clean the feature caches: ``python -m coco_multilabel.clean_cache [DIR] [--older-than DAYS]
[--keep-gb GB] [--yes]`` (``make clean-cache``).

Every change to a cache's key (backbone, image size, cut, files) makes a new folder under
``outputs/cache`` and none is ever removed: an image-size sweep leaves four. This lists each
cache with its size on disk and its last use (recorded by every read, ``feature_cache.mark_used``),
and removes those unused for ``--older-than`` days and then the least recently used until at most
``--keep-gb`` remain; what killed builds left (``.<key>.<pid>.tmp``) is always removed. A dry run
unless ``--yes``. A cache being built (its lock held, or its builder running) is never removed, and
a removal holds the cache's lock, so a run that wants it waits and then builds it again. The labels
index (``labels/``) is not a feature cache: it is small, and rebuilt from the label files when missing.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from filelock import Timeout

from coco_multilabel.cli import report_user_errors
from coco_multilabel.data.feature_cache import (
    LAST_USE,
    builder_alive,
    cache_lock,
    is_locked,
    remove_leftover,
)
from coco_multilabel.data.label_index import INDEX_FOLDER
from coco_multilabel.errors import UserError
from coco_multilabel.progress import plural

GB = 1024**3
DAY = 86400.0


@dataclass
class Cache:
    folder: Path
    size: int  # bytes on disk: the arrays of an unfinished build are sparse
    last_use: float  # when a run last read it, else when it was last written
    building: bool
    leftover: bool = False  # the unfinished folder of a build that was killed

    @property
    def key(self) -> str:
        return self.folder.name


def disk_usage(folder: Path) -> tuple[int, float]:
    """Bytes ``folder``'s files take on disk (as ``du``) and the newest modification time."""
    stats = [p.stat() for p in folder.rglob("*") if p.is_file()]
    newest = max((s.st_mtime for s in stats), default=folder.stat().st_mtime)
    return sum(s.st_blocks * 512 for s in stats), newest


def list_caches(cache_dir: Path) -> list[Cache]:
    """The caches of ``cache_dir``, least recently used first, with the unfinished folders of builds
    (``.<key>.<pid>.tmp``): building while their lock is held or their process runs on this machine,
    else leftovers of a killed build."""
    caches = []
    for folder in sorted(p for p in cache_dir.iterdir() if p.is_dir() and p.name != INDEX_FOLDER):
        size, written = disk_usage(folder)
        record = folder / LAST_USE
        last_use = record.stat().st_mtime if record.is_file() else written
        unfinished = folder.name.startswith(".") and folder.name.endswith(".tmp")
        building = is_locked(folder) or (unfinished and builder_alive(folder))
        caches.append(Cache(folder, size, last_use, building, leftover=unfinished and not building))
    return sorted(caches, key=lambda c: c.last_use)


def choose(
    caches: list[Cache], older_than_days: float | None, keep_gb: float | None, now: float
) -> list[Cache]:
    """What to remove: every leftover of a killed build; then caches unused for more than
    ``older_than_days``, then the least recently used until the rest fits in ``keep_gb``; never a
    cache being built."""
    removable = [c for c in caches if not c.building]
    chosen = [c for c in removable if c.leftover]
    chosen += [
        c
        for c in removable
        if not c.leftover and older_than_days is not None and now - c.last_use > older_than_days * DAY
    ]
    if keep_gb is not None:
        total = sum(c.size for c in caches if c not in chosen)
        for cache in removable:  # least recently used first
            if total <= keep_gb * GB:
                break
            if cache not in chosen:
                chosen.append(cache)
                total -= cache.size
    return chosen


def remove(cache: Cache) -> bool:
    """Delete one cache holding its lock; False when a builder holds it now."""
    if cache.leftover:
        return remove_leftover(cache.folder)
    try:
        with cache_lock(cache.folder).acquire(timeout=0):
            shutil.rmtree(cache.folder)
    except Timeout:
        return False
    return True


def table(caches: list[Cache], chosen: list[Cache], now: float, apply: bool, index_size: int = 0) -> str:
    verb = "removed" if apply else "would remove"
    lines = [f"{'cache':<34} {'on disk':>9} {'last use':>14}  "]
    for c in caches:
        if c.building:
            state = "building: kept"
        else:
            state = "left by a killed build: " * c.leftover + (verb if c in chosen else "")
        lines.append(f"{c.key:<34} {human_size(c.size):>9} {_age(now - c.last_use):>14}  {state}")
    freed = sum(c.size for c in chosen)
    total = sum(c.size for c in caches)
    leftovers = sum(c.leftover for c in caches)
    counted = plural(len(caches) - leftovers, "cache") + f" and {plural(leftovers, 'leftover')}" * bool(
        leftovers
    )
    lines.append(f"{counted}, {human_size(total)}; {verb} {len(chosen)}, {human_size(freed)}")
    if index_size:
        lines.append(f"(and {INDEX_FOLDER}/, the labels index: {human_size(index_size)}, kept)")
    if chosen and not apply:
        lines.append("a dry run: add --yes to delete them")
    return "\n".join(lines)


def clean(
    cache_dir: str | Path, older_than_days: float | None = None, keep_gb: float | None = None, apply=False
) -> tuple[list[Cache], list[Cache], str]:
    """``(caches, chosen, table)``; with ``apply`` the chosen caches are deleted."""
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        raise UserError(
            f"{cache_dir} is not a folder: pass the folder your runs cache features in (their "
            'data.cache_dir, default outputs/cache): make clean-cache ARGS="<folder>"'
        )
    now = time.time()
    caches = list_caches(cache_dir)
    chosen = choose(caches, older_than_days, keep_gb, now)
    if apply:
        for cache in list(chosen):
            if not remove(cache):
                cache.building = True
                chosen.remove(cache)
    index = cache_dir / INDEX_FOLDER
    index_size = disk_usage(index)[0] if index.is_dir() else 0
    return caches, chosen, table(caches, chosen, now, apply, index_size)


def human_size(size: int) -> str:
    """``20 KB``, ``240 MB``, ``1.27 GB``: a leftover of kilobytes does not read as 0.00 GB."""
    for unit, scale in (("GB", GB), ("MB", 1024**2), ("KB", 1024)):
        if size >= scale:
            return f"{size / scale:.2f} {unit}" if unit == "GB" else f"{size / scale:.0f} {unit}"
    return f"{size} B"


def _age(seconds: float) -> str:
    if seconds < 60:
        return "just now"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min ago"
    if seconds < DAY:
        return f"{seconds / 3600:.1f} h ago"
    return f"{seconds / DAY:.1f} days ago"


@report_user_errors
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cache_dir", nargs="?", default="outputs/cache", help="default: outputs/cache")
    parser.add_argument("--older-than", type=float, metavar="DAYS", help="remove caches unused for DAYS")
    parser.add_argument("--keep-gb", type=float, metavar="GB", help="then the least recently used, to GB")
    parser.add_argument("--yes", action="store_true", help="delete (default: a dry run that lists)")
    args = parser.parse_args(argv)
    _, _, text = clean(args.cache_dir, args.older_than, args.keep_gb, args.yes)
    print(text)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
