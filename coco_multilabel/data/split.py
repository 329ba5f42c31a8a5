"""The seeded train/val split, kept on disk (``split.json``) so resume, submit and report agree."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

from coco_multilabel.errors import UserError
from coco_multilabel.io import write_json_atomic

log = logging.getLogger(__name__)


def make_split(stems: list[str], val_fraction: float, seed: int) -> dict:
    """A random, seeded, disjoint train/val split of ``stems`` (independent of their order)."""
    if not 0 < val_fraction < 1:
        raise UserError(f"data.val_fraction must be between 0 and 1, got {val_fraction}")
    shuffled = sorted(stems)
    random.Random(seed).shuffle(shuffled)
    n_val = max(1, round(len(shuffled) * val_fraction))
    return {
        "seed": seed,
        "val_fraction": val_fraction,
        "train": sorted(shuffled[n_val:]),
        "val": sorted(shuffled[:n_val]),
    }


def load_or_make_split(split_file: Path | None, stems: list[str], val_fraction: float, seed: int) -> dict:
    """Read the run's ``split.json`` when it exists (resume, submit), else make and write it."""
    if split_file is not None and split_file.exists():
        split = read_split(split_file)
        missing = sorted(set(split["train"] + split["val"]) - set(stems))
        if missing:
            raise UserError(
                f"{split_file} lists {len(missing)} images that data.root lacks (first: {missing[0]}); "
                "point data.root at the data this run was trained on"
            )
        new = len(stems) - len(split["train"]) - len(split["val"])
        if new:
            log.warning("%d labelled images are not in %s and are left out", new, split_file)
        return split
    split = make_split(stems, val_fraction, seed)
    if split_file is not None:
        write_json_atomic(split_file, split, indent=1)
    return split


def read_split(split_file: Path) -> dict:
    """A run's split, or a UserError: it is the one file of a run a user may be tempted to edit."""
    try:
        split = json.loads(split_file.read_text(encoding="utf-8"))
        if not all(isinstance(split.get(key), list) for key in ("train", "val")):
            raise ValueError('it needs the lists "train" and "val"')
    except (ValueError, AttributeError, OSError) as err:
        raise UserError(
            f"{split_file} is not a valid split ({err}); restore it, or delete it to draw a new split "
            "(the val images then change)"
        ) from err
    return split


def split_image_paths(split_file: Path, root: Path, part: str = "val") -> list[Path]:
    """The image files of one part (``train`` or ``val``) of a run's split."""
    if not split_file.is_file():
        raise UserError(f"{split_file} does not exist: the run's split is needed to find its {part} images")
    return [root / "images" / "train" / f"{stem}.jpg" for stem in read_split(split_file)[part]]
