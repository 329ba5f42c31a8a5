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
from rich.progress import track
from torch.utils.data import DataLoader, Dataset

from coco_multilabel.data.datasets import CocoImages
from coco_multilabel.io import check_free_space

log = logging.getLogger(__name__)


def cache_key(
    backbone_cfg: dict, transform, image_paths: list[Path], flip: bool, cut: dict | None = None
) -> str:
    """A hash of everything that determines the cached features."""
    weights_file = backbone_cfg.get("weights_file")
    parts = {
        "cut": cut,  # where the trunk ends, and the normalisation before it
        "backbone": backbone_cfg,
        "weights_file": _file_identity(Path(weights_file)) if weights_file else None,
        "transform": repr(transform),
        "flip": flip,
        "images": [_file_identity(p) for p in image_paths],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


@dataclass
class FeatureCache:
    stems: list[str]
    features: np.ndarray  # N x D (or N x C x h x w), memory-mapped
    flipped: np.ndarray | None  # features of the horizontally flipped images, or None

    @classmethod
    def load(cls, folder: Path) -> FeatureCache:
        flipped = folder / "flipped.npy"
        return cls(
            json.loads((folder / "stems.json").read_text()),
            np.load(folder / "features.npy", mmap_mode="r"),
            np.load(flipped, mmap_mode="r") if flipped.exists() else None,
        )


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
) -> FeatureCache:
    """The cache for these images, built on first use into a temporary folder renamed into place.

    ``extract`` maps a batch of images to what is kept (an eval-mode backbone, or the model's
    ``trunk_features``); ``cut`` says where it ends, for the key."""
    key = cache_key(backbone_cfg, transform, image_paths, flip, cut)
    folder = Path(cache_dir) / key
    if (folder / "stems.json").exists():
        log.info("feature cache hit: %s", folder)
        return FeatureCache.load(folder)
    tmp = folder.with_name(f".{key}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        loader = DataLoader(
            CocoImages(image_paths, transform=transform),
            batch_size=batch_size,
            num_workers=num_workers,
            generator=torch.Generator(),  # leave the global RNG, and so the training run, untouched
        )
        files = {"features.npy": False, **({"flipped.npy": True} if flip else {})}
        arrays = {}
        with torch.no_grad():
            start = 0
            for images, _ in track(loader, description=f"caching features of {len(image_paths)} images"):
                for name, flipped in files.items():
                    out = extract(images.flip(-1) if flipped else images).float().cpu().numpy()
                    if name not in arrays:
                        dtype = np.float32 if out.ndim == 2 else np.float16
                        size = len(files) * len(image_paths) * out[0].size * np.dtype(dtype).itemsize
                        check_free_space(tmp, size, f"feature cache {folder}", "data.cache_dir=<other disk>")
                        arrays[name] = np.lib.format.open_memmap(
                            tmp / name, mode="w+", dtype=dtype, shape=(len(image_paths), *out.shape[1:])
                        )
                    arrays[name][start : start + len(out)] = out
                start += len(images)
        for array in arrays.values():
            array.flush()
        del arrays
        (tmp / "stems.json").write_text(json.dumps([p.stem for p in image_paths]))
        (tmp / "key.json").write_text(
            json.dumps({"backbone": backbone_cfg, "cut": cut, "transform": repr(transform)}, default=str)
        )
        try:
            tmp.rename(folder)
        except OSError:  # another process built the same cache meanwhile: use theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("feature cache built: %s", folder)
    return FeatureCache.load(folder)


class CachedFeatures(Dataset):
    """(feature, target) pairs for ``stems`` of a cache, as stored (float16 maps stay float16: the
    model casts); ``flip_prob`` serves the mirror image's copy that often, as a random flip would,
    ``pairs`` serves both copies (2 x ...) for flip test-time augmentation."""

    def __init__(
        self,
        cache: FeatureCache,
        stems: list[str],
        targets: list[torch.Tensor],
        flip_prob: float = 0.0,
        pairs: bool = False,
    ):
        index = {stem: i for i, stem in enumerate(cache.stems)}
        self.rows = [index[s] for s in stems]
        self.cache, self.targets = cache, targets
        self.flip_prob = flip_prob if cache.flipped is not None else 0.0
        self.pairs = pairs and cache.flipped is not None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        if self.pairs:
            row = self.rows[i]
            pair = np.stack([self.cache.features[row], self.cache.flipped[row]])
            return torch.from_numpy(pair), self.targets[i]
        flipped = self.flip_prob and torch.rand(()) < self.flip_prob
        source = self.cache.flipped if flipped else self.cache.features
        return torch.from_numpy(np.array(source[self.rows[i]])), self.targets[i]


def _file_identity(path: Path) -> list:
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]
