"""A frozen backbone's features, computed once per image and memory-mapped from disk.

With a frozen backbone every epoch recomputes the same features; the head trains on cached ones
in a fraction of the time, and a sweep over head settings (lr, dropout, loss, epochs,
thresholds) reuses the cache. The key covers everything that changes a feature: the backbone's
config and weights file, where the frozen trunk ends (``cut``), the eval transform, the flip copy,
and the exact images (path, size, mtime); any change builds a new cache in a new folder.

Pooled features are kept in float32; feature maps (for a top that trains, or a spatial head) in
float16, half the disk: Lite0 at 384 px below its last stage takes 55 kB an image, as much again
for its mirror image; the final 1280-channel map would take 7 times that.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock, Timeout
from torch.utils.data import DataLoader, Dataset

from coco_multilabel.data.datasets import CocoImages, collate_skipping_bad
from coco_multilabel.data.labels import CHECK_DATA_HINT
from coco_multilabel.errors import UserError
from coco_multilabel.io import disk_free, existing_parent, human_bytes
from coco_multilabel.progress import track
from coco_multilabel.resources import job_memory_available

log = logging.getLogger(__name__)


def cache_key(
    backbone_cfg: dict,
    transform,
    image_paths: list[Path],
    flip: bool,
    cut: dict | None = None,
    min_side: int | None = None,
) -> str:
    """A hash of everything that determines the cached features (``min_side``: JPEGs decoded at a
    reduced scale, see ``load_rgb``)."""
    weights_file = backbone_cfg.get("weights_file")
    parts = {
        "cut": cut,  # where the trunk ends, and the normalisation before it
        "backbone": backbone_cfg,
        "weights_file": _file_identities([Path(weights_file)])[0] if weights_file else None,
        "transform": repr(transform),
        "flip": flip,
        "images": _file_identities(image_paths),
        **({"min_side": min_side} if min_side else {}),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


LAST_USE = "last_use"  # an empty file each load touches: its mtime is when the cache was last read


def mark_used(folder: Path) -> None:
    """Record a read for ``make clean-cache`` (access times are not kept on most mounts, relatime)."""
    try:
        (Path(folder) / LAST_USE).touch()
    except OSError:  # a read-only copy of the cache is still a cache
        pass


def is_complete(folder: Path) -> bool:
    """A cache folder appears by a rename once complete; ``stems.json`` is written last before it."""
    return (Path(folder) / "stems.json").is_file()


def cache_folders(cache_dir: str | Path) -> list[Path]:
    """The complete feature caches in ``cache_dir`` (which also holds the labels index and locks)."""
    cache_dir = Path(cache_dir)
    return sorted(p for p in cache_dir.iterdir() if is_complete(p)) if cache_dir.is_dir() else []


@dataclass
class FeatureCache:
    stems: list[str]
    features: np.ndarray  # N x D (or N x C x h x w): in memory, or memory-mapped
    flipped: np.ndarray | None  # features of the horizontally flipped images, or None
    present: np.ndarray | None = None  # N bool: False for an unreadable image left out (on_bad_image=skip)

    @classmethod
    def load(cls, folder: Path, in_memory: bool | None = None, share: int = 1) -> FeatureCache:
        """The cache in ``folder``: read into memory when it takes under ``MEMORY_FRACTION`` of the
        memory this job may still use (its cgroup limit counted), ``share`` processes of this machine
        loading it each (``in_memory=None``), memory-mapped otherwise (the page cache serves
        repeated reads)."""
        folder = Path(folder)
        mark_used(folder)
        names = [name for name in ARRAYS if (folder / name).exists()]
        if in_memory is None:
            mapped = [np.load(folder / name, mmap_mode="r") for name in names]
            in_memory = fits_in_memory(sum(a.nbytes for a in mapped), share, job_memory_available())
        arrays = [np.load(folder / name, mmap_mode=None if in_memory else "r") for name in names]
        present = folder / "present.npy"
        return cls(
            json.loads((folder / "stems.json").read_text()),
            arrays[0],
            arrays[1] if len(arrays) > 1 else None,
            np.load(present) if present.exists() else None,
        )


MEMORY_FRACTION = 0.3
ARRAYS = ("features.npy", "flipped.npy")  # of an image, of its mirror image


def fits_in_memory(size: int, share: int, memory: int | None) -> bool:
    """Whether ``share`` copies of ``size`` bytes take under ``MEMORY_FRACTION`` of ``memory``."""
    return memory is not None and share * size < MEMORY_FRACTION * memory


@dataclass(frozen=True)
class CachePlan:
    """What a feature cache will take, said before it is built: its size, whether it will be read
    into memory or memory-mapped, and whether its disk holds it (else a refusal naming what to
    change). ``memory``: what this job may still use (``resources.job_memory_available``)."""

    folder: Path
    images: int
    views: int  # 2 with the mirror images' rows
    row_bytes: int
    memory: int | None
    share: int  # processes of this machine that each load it (DDP ranks)
    disk_free: int

    @property
    def size(self) -> int:
        return self.images * self.views * self.row_bytes

    @property
    def in_memory(self) -> bool:
        return fits_in_memory(self.size, self.share, self.memory)

    def line(self) -> str:
        views = " and their mirror images" if self.views == 2 else ""
        memory = "the memory this job may use is unknown" if self.memory is None else (
            f"{human_bytes(self.memory)} this job may still use"
        )  # fmt: skip
        copies = f"{self.share} copies " if self.share > 1 else ""
        where = (
            f"read into memory ({copies}under {MEMORY_FRACTION:.0%} of the {memory})"
            if self.in_memory
            else f"memory-mapped from disk ({copies}over {MEMORY_FRACTION:.0%} of the {memory})"
        )
        return (
            f"feature cache: {self.images:,} images{views} x {human_bytes(self.row_bytes)} = "
            f"{human_bytes(self.size)}, {where}; {human_bytes(self.disk_free)} free on "
            f"{existing_parent(self.folder.parent)}"
        )

    def check(self) -> None:
        """A UserError before anything is computed or written when the disk cannot hold the cache."""
        if self.size * 1.1 <= self.disk_free:
            return
        halve = ", no mirror images (data.cache_flip=false: half)" if self.views == 2 else ""
        raise UserError(
            f"the feature cache does not fit: {self.line()}. Cache less: fewer top stages (a lower "
            "model.top_stages caches a map nearer the output, smaller for most CNNs), a smaller backbone "
            "(backbone=efficientnet_lite0: 55 kB an image at 384 px), a linear probe on pooled features "
            f"(experiment=linear_probe), a smaller data.image_size{halve}; or put it on a disk with room: "
            "data.cache_dir=<folder>"
        )


def plan_cache(folder: Path, rows: int, sample: torch.Tensor, flip: bool, share: int = 1) -> CachePlan:
    """The plan of a cache of ``rows`` images whose rows look like ``sample`` (the trunk's output
    for one image), in ``folder``."""
    row_bytes = sample[0].numel() * np.dtype(storage_dtype(sample)).itemsize
    memory = job_memory_available()
    return CachePlan(Path(folder), rows, 1 + flip, row_bytes, memory, share, disk_free(Path(folder).parent))


def storage_dtype(features: torch.Tensor) -> np.dtype:
    """Pooled features in float32; maps in float16, half the disk (the model casts them)."""
    return np.dtype(np.float32 if features.dim() == 2 else np.float16)


def create_arrays(tmp: Path, rows: int, sample: torch.Tensor, flip: bool) -> None:
    """The unfinished cache's arrays, shaped after ``sample`` (the trunk's output for one image),
    once the disk is known to hold them."""
    plan_cache(tmp, rows, sample, flip).check()
    tmp.mkdir(parents=True)
    for name in ARRAYS[: 1 + flip]:
        array = np.lib.format.open_memmap(
            tmp / name, mode="w+", dtype=storage_dtype(sample), shape=(rows, *sample.shape[1:])
        )
        del array


class RowWriter:
    """Writes rows by dataset index into an unfinished cache's arrays; each process its own rows,
    which it then lists in ``present.<rank>.npy`` (``finish`` puts them together)."""

    def __init__(self, tmp: Path, rank: int = 0):
        self.tmp, self.rank = Path(tmp), rank
        self.arrays = [
            np.load(self.tmp / name, mmap_mode="r+") for name in ARRAYS if (self.tmp / name).exists()
        ]
        self.written: list[np.ndarray] = []

    def write(self, indices, features: torch.Tensor, flipped: torch.Tensor | None = None) -> None:
        indices = np.asarray(indices)
        for array, values in zip(self.arrays, (features, flipped), strict=False):
            # converted where they were computed: half the bytes cross from the GPU
            array[indices] = values.to(getattr(torch, array.dtype.name)).cpu().numpy()
        self.written.append(indices)

    def close(self) -> None:
        for array in self.arrays:
            array.flush()
        self.arrays = []
        written = np.concatenate(self.written) if self.written else np.zeros(0, np.int64)
        np.save(self.tmp / f"present.{self.rank}.npy", written)


def finish(tmp: Path, folder: Path, stems: list[str], ranks: int, key_info: dict) -> None:
    """Put the ranks' lists of written rows together, then rename the finished folder into place."""
    present = np.zeros(len(stems), dtype=bool)
    for rank in range(ranks):
        part = tmp / f"present.{rank}.npy"
        present[np.load(part)] = True
        part.unlink()
    if not present.any():
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"no image could be read to build the feature cache {folder}; {CHECK_DATA_HINT}")
    if not present.all():
        log.warning("the feature cache leaves out %d unreadable images (data.on_bad_image=skip)",
                    int((~present).sum()))  # fmt: skip
    np.save(tmp / "present.npy", present)
    (tmp / "key.json").write_text(json.dumps(key_info, default=str))
    (tmp / "stems.json").write_text(json.dumps(stems))
    try:
        tmp.rename(folder)
    except OSError:  # built meanwhile by a process that did not take the lock: theirs is as good
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("feature cache built: %s", folder)


def unfinished_folder(folder: Path) -> Path:
    """Where this process builds ``folder`` (call under its lock); what killed builds left, of this
    cache or any other, is removed first."""
    for stale in folder.parent.glob(f".{folder.name}.*.tmp"):  # ours: we hold its lock
        shutil.rmtree(stale, ignore_errors=True)
    for leftover in leftover_builds(folder.parent):
        remove_leftover(leftover)
    return folder.with_name(f".{folder.name}.{os.getpid()}.tmp")


def leftover_builds(cache_dir: str | Path) -> list[Path]:
    """The unfinished folders (``.<key>.<pid>.tmp``) of builds that were killed: no process holds
    their cache's lock, and their process is not running on this machine."""
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        return []
    return [
        p for p in sorted(cache_dir.glob(".*.tmp"))
        if p.is_dir() and not builder_alive(p) and not is_locked(p)
    ]  # fmt: skip


def remove_leftover(folder: Path) -> bool:
    """Delete a killed build's folder holding its cache's lock; False when a builder has it now."""
    try:
        with cache_lock(folder).acquire(timeout=0):
            if builder_alive(folder):
                return False
            shutil.rmtree(folder, ignore_errors=True)
    except Timeout:
        return False
    log.info("removed %s, left by a killed feature cache build", folder)
    return True


def is_locked(folder: Path) -> bool:
    """Whether a process holds the lock of ``folder``'s cache now (listing creates no lock file)."""
    lock = cache_lock(folder)
    if not Path(lock.lock_file).exists():
        return False
    try:
        with lock.acquire(timeout=0):
            return False
    except Timeout:
        return True


def builder_alive(folder: Path) -> bool:
    """``.<key>.<pid>.tmp``: is ``pid`` a running process here?"""
    try:
        os.kill(int(folder.name.split(".")[-2]), 0)
    except (ValueError, IndexError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def cache_lock(folder: Path) -> FileLock:
    """One builder per cache at a time, machine- or file-system-wide (``flock``): a sweep job that
    finds another building the same cache waits for it and then reuses it; ``make clean-cache``
    removes a cache only while holding it. ``<cache dir>/.<key>.lock``, also for ``.<key>.<pid>.tmp``."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(folder.with_name(f".{folder.name.lstrip('.').split('.')[0]}.lock")))


def build_or_load(
    cache_dir: str | Path,
    image_paths: list[Path],
    extract: Callable[[torch.Tensor], torch.Tensor],
    backbone_cfg: dict,
    transform,
    flip: bool = False,
    batch_size: int = 64,
    num_workers: int = 0,
    cut: dict | None = None,
    on_bad_image: str = "error",
    min_side: int | None = None,
) -> FeatureCache:
    """The cache for these images, built here, in this process, on first use (training builds it
    through the trainer instead: ``training/cache_build.py``).

    ``extract`` maps a batch of images to what is kept (an eval-mode backbone, or the model's
    ``trunk_features``); ``cut`` says where it ends, for the key."""
    folder = Path(cache_dir) / cache_key(backbone_cfg, transform, image_paths, flip, cut, min_side)
    with cache_lock(folder):
        if is_complete(folder):
            log.info("feature cache hit: %s", folder)
            return FeatureCache.load(folder)
        tmp = unfinished_folder(folder)
        try:
            loader = DataLoader(
                CocoImages(image_paths, transform=transform, min_side=min_side, on_bad_image=on_bad_image),
                batch_size=batch_size,
                num_workers=num_workers,
                collate_fn=collate_skipping_bad,
                generator=torch.Generator(),  # leave the global RNG, and so the training run, untouched
            )
            writer = None
            with torch.no_grad():
                batches = track(
                    loader, "building the feature cache", len(image_paths), count=lambda b: len(b["indices"])
                )
                for batch in batches:
                    images = batch["images"]
                    features = extract(images)
                    if writer is None:
                        create_arrays(tmp, len(image_paths), features, flip)
                        writer = RowWriter(tmp)
                    writer.write(batch["indices"], features, extract(images.flip(-1)) if flip else None)
            writer.close()
            finish(tmp, folder, [p.stem for p in image_paths], 1, key_info(backbone_cfg, cut, transform))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return FeatureCache.load(folder)


def key_info(backbone_cfg: dict, cut: dict | None, transform) -> dict:
    """What ``key.json`` says the cache holds, for a person looking into the folder."""
    return {"backbone": backbone_cfg, "cut": cut, "transform": repr(transform)}


class CachedFeatures(Dataset):
    """``{features, targets, indices, kept}`` batches for ``stems`` of a cache, read whole: the
    DataLoader's batch of indices goes to ``__getitems__``, which reads the rows in one indexing of
    one contiguous array (in order, for a memory map's sake) and :func:`whole_batch` passes the batch
    on. Features stay as stored (float16 maps: the model casts them on its device). ``flip_prob``
    serves the mirror image's rows that often, as a random flip would; ``pairs`` serves them
    beside the image's, as ``mirror_features``, for flip test-time augmentation. With ``device``
    the rows are copied there once and batches are indexed there (``data.cache_on_device``). Rows
    the cache left out (unreadable images) are left out here too. ``__getitem__`` reads one row,
    the same way."""

    def __init__(
        self,
        cache: FeatureCache,
        stems: list[str],
        targets: np.ndarray,
        flip_prob: float = 0.0,
        pairs: bool = False,
        device: torch.device | str | None = None,
    ):
        index = {stem: i for i, stem in enumerate(cache.stems)}
        rows = np.array([index[s] for s in stems], dtype=np.int64)
        targets = np.asarray(targets)
        if cache.present is not None and not cache.present[rows].all():
            keep = cache.present[rows]
            log.warning("%d of %d images are not in the feature cache (unreadable) and are left out",
                        int((~keep).sum()), len(rows))  # fmt: skip
            rows, targets = rows[keep], targets[keep]
        self.rows, self.targets = rows, torch.from_numpy(targets.astype(np.float32))
        self.features, self.flipped = cache.features, cache.flipped
        self.flip_prob = flip_prob if cache.flipped is not None else 0.0
        self.pairs = pairs and cache.flipped is not None
        self.device = None if device is None else torch.device(device)
        if self.device is not None:  # this subset's rows, contiguous, on the device
            order = np.argsort(rows)
            self.features, self.flipped = (
                None if a is None else torch.from_numpy(_read(a, rows, order)).to(self.device)
                for a in (cache.features, cache.flipped)
            )
            self.targets = self.targets.to(self.device)
            self.rows = np.arange(len(rows))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        row = self.rows[i]
        if self.pairs:
            return {"features": _tensor(self.features[row]), "mirror_features": _tensor(self.flipped[row]),
                    "targets": self.targets[i], "indices": i}  # fmt: skip
        flipped = self.flip_prob and torch.rand(()) < self.flip_prob
        feature = (self.flipped if flipped else self.features)[row]
        return {"features": _tensor(feature), "targets": self.targets[i], "indices": i}

    def __getitems__(self, positions: list[int]):
        positions = np.asarray(positions, dtype=np.int64)
        rows = self.rows[positions]
        on_device = self.device is not None
        index = torch.from_numpy(rows).to(self.device) if on_device else rows
        order = None if on_device else np.argsort(rows)
        read = (lambda a, r, o: a[r]) if on_device else _read
        batch = {"features": _tensor(read(self.features, index, order), fresh=True)}
        if self.pairs:
            batch["mirror_features"] = _tensor(read(self.flipped, index, order), fresh=True)
        elif self.flip_prob:
            flip = (torch.rand(len(rows)) < self.flip_prob).numpy()
            if flip.any():
                sub = index[torch.from_numpy(flip).to(self.device)] if on_device else rows[flip]
                features = batch["features"]
                features[torch.from_numpy(flip).to(features.device)] = _tensor(
                    read(self.flipped, sub, None if on_device else np.argsort(sub)), fresh=True
                )
        return {
            **batch,
            "targets": self.targets[torch.from_numpy(positions).to(self.targets.device)],
            "indices": torch.from_numpy(positions),
            "kept": torch.ones(len(rows), dtype=torch.bool),
        }


@dataclass(frozen=True)
class CachedSplit:
    """A split's rows of a feature cache: what a datamodule serves instead of images
    (``CocoDataModule.serve``); val's with their mirror image's, for flip TTA."""

    train: CachedFeatures
    val: CachedFeatures


def whole_batch(batch):
    """The collate function of :class:`CachedFeatures`: its batches come whole from ``__getitems__``."""
    return batch


def _read(array: np.ndarray, rows: np.ndarray, order: np.ndarray) -> np.ndarray:
    """``array[rows]``, read in ascending row order."""
    out = np.empty((len(rows), *array.shape[1:]), dtype=array.dtype)
    out[order] = array[rows[order]]
    return out


def _tensor(x, fresh: bool = False) -> torch.Tensor:
    """A tensor of ``x``; a numpy row is copied (it may be a read-only view of a memory map)
    unless ``fresh`` says it was just read into its own array."""
    if isinstance(x, torch.Tensor):
        return x
    return torch.from_numpy(x if fresh else np.array(x))


def _file_identities(paths: list[Path]) -> list[list]:
    """``[resolved path, size, mtime_ns]`` of each file: one stat each, each folder resolved once."""
    folders: dict[Path, Path] = {}
    out = []
    for path in map(Path, paths):
        folder = folders.get(path.parent) or folders.setdefault(path.parent, path.parent.resolve())
        stat = os.stat(path)
        out.append([str(folder / path.name), stat.st_size, stat.st_mtime_ns])
    return out
