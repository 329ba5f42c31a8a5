"""Clean the feature caches: ``python -m coco_multilabel.clean_cache [DIR] [--older-than DAYS]
[--keep-gb GB] [--yes]`` (``make clean-cache``).

Every change to a cache's key (backbone, image size, cut, files) makes a new folder under
``outputs/cache`` and none is ever removed: an image-size sweep leaves four. This lists each
cache with its size and last use, and removes those unused for ``--older-than`` days and then the
least recently used until at most ``--keep-gb`` remain. A dry run unless ``--yes``. A cache being
built (a temporary folder of a running process, or its lock held) is never removed, and a
removal holds the cache's lock, so a run that wants it waits and then builds it again.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from filelock import Timeout

from coco_multilabel.cli import report_user_errors
from coco_multilabel.data.feature_cache import cache_lock
from coco_multilabel.errors import UserError

GB = 1024**3
DAY = 86400.0


@dataclass
class Cache:
    folder: Path
    size: int
    last_use: float  # the newest access or modification time of its files
    building: bool

    @property
    def key(self) -> str:
        return self.folder.name


def list_caches(cache_dir: Path) -> list[Cache]:
    """The caches of ``cache_dir``, least recently used first; a builder's temporary folder
    (``.<key>.<pid>.tmp``) counts as building while its process runs on this machine."""
    caches = []
    for folder in sorted(p for p in cache_dir.iterdir() if p.is_dir()):
        files = [p for p in folder.rglob("*") if p.is_file()]
        stats = [p.stat() for p in files] or [folder.stat()]
        size = sum(s.st_size for s in stats) if files else 0
        last_use = max(max(s.st_atime, s.st_mtime) for s in stats)
        building = _is_locked(folder) or (folder.name.endswith(".tmp") and _builder_alive(folder))
        caches.append(Cache(folder, size, last_use, building))
    return sorted(caches, key=lambda c: c.last_use)


def choose(
    caches: list[Cache], older_than_days: float | None, keep_gb: float | None, now: float
) -> list[Cache]:
    """What to remove: unused for more than ``older_than_days``, then the least recently used until
    the rest fits in ``keep_gb``; never a cache being built."""
    removable = [c for c in caches if not c.building]
    chosen = [
        c for c in removable if older_than_days is not None and now - c.last_use > older_than_days * DAY
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
    try:
        with cache_lock(cache.folder).acquire(timeout=0):
            shutil.rmtree(cache.folder)
    except Timeout:
        return False
    return True


def table(caches: list[Cache], chosen: list[Cache], now: float, apply: bool) -> str:
    verb = "removed" if apply else "would remove"
    lines = [f"{'cache':<34} {'size':>9} {'last use':>14}  "]
    for c in caches:
        state = "building: kept" if c.building else (verb if c in chosen else "")
        lines.append(f"{c.key:<34} {c.size / GB:>7.2f} GB {_age(now - c.last_use):>14}  {state}")
    freed = sum(c.size for c in chosen) / GB
    total = sum(c.size for c in caches) / GB
    lines.append(f"{len(caches)} caches, {total:.2f} GB; {verb} {len(chosen)}, {freed:.2f} GB")
    if chosen and not apply:
        lines.append("a dry run: add --yes to delete them")
    return "\n".join(lines)


def clean(
    cache_dir: str | Path, older_than_days: float | None = None, keep_gb: float | None = None, apply=False
) -> tuple[list[Cache], list[Cache], str]:
    """``(caches, chosen, table)``; with ``apply`` the chosen caches are deleted."""
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        raise UserError(f"{cache_dir} is not a folder: pass the feature cache folder (data.cache_dir)")
    now = time.time()
    caches = list_caches(cache_dir)
    chosen = choose(caches, older_than_days, keep_gb, now)
    if apply:
        for cache in list(chosen):
            if not remove(cache):
                cache.building = True
                chosen.remove(cache)
    return caches, chosen, table(caches, chosen, now, apply)


def _is_locked(folder: Path) -> bool:
    lock = cache_lock(folder)
    if not Path(lock.lock_file).exists():  # listing leaves no lock files behind
        return False
    try:
        with lock.acquire(timeout=0):
            return False
    except Timeout:
        return True


def _builder_alive(folder: Path) -> bool:
    """``.<key>.<pid>.tmp``: is ``pid`` a running process here?"""
    try:
        os.kill(int(folder.name.split(".")[-2]), 0)
    except (ValueError, IndexError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def _age(seconds: float) -> str:
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
