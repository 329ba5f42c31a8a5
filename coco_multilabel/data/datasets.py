"""Datasets over the challenge layout: ``images/<split>/<stem>.jpg`` and ``labels/train/<stem>.cls``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

from coco_multilabel.data.labels import read_label_file, to_multi_hot
from coco_multilabel.errors import UserError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".JPG", ".JPEG")


def list_images(image_dir: str | Path) -> list[Path]:
    """The JPEG files of ``image_dir``, sorted by stem."""
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise UserError(f"image folder {image_dir} does not exist")
    return sorted((p for p in image_dir.iterdir() if p.suffix in IMAGE_SUFFIXES), key=lambda p: p.stem)


def load_rgb(path: str | Path, min_side: int | None = None) -> Image.Image:
    """Decode an image, apply its EXIF orientation and convert any mode to RGB.

    With ``min_side``, a JPEG is decoded at a reduced scale (1/2, 1/4, 1/8) that keeps both sides
    at least ``min_side``: much less work when the model looks at smaller images anyway.
    """
    try:
        with Image.open(path) as image:
            if min_side:
                image.draft("RGB", (min_side, min_side))
            return ImageOps.exif_transpose(image).convert("RGB")
    except (OSError, UnidentifiedImageError) as err:
        raise UserError(f"cannot read image {path}: {err} (run `make check-data`)") from err


class CocoImages(Dataset):
    """Images with multi-hot targets (``labels`` given) or with an empty target (test images)."""

    def __init__(
        self,
        image_paths: list[Path],
        labels: list[list[int]] | None = None,
        transform: Callable | None = None,
        num_classes: int = 80,
        min_side: int | None = None,
    ):
        if labels is not None and len(labels) != len(image_paths):
            raise ValueError("one label list per image is needed")
        self.image_paths = list(image_paths)
        self.targets = None if labels is None else [to_multi_hot(c, num_classes) for c in labels]
        self.transform = transform
        self.min_side = min_side

    @property
    def stems(self) -> list[str]:
        return [p.stem for p in self.image_paths]

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = load_rgb(self.image_paths[index], self.min_side)
        if self.transform is not None:
            image = self.transform(image)
        target = torch.zeros(0) if self.targets is None else self.targets[index]
        return image, target

    @classmethod
    def labelled(
        cls, root: str | Path, stems: list[str], transform=None, num_classes: int = 80, min_side=None
    ):
        """Images ``root/images/train/<stem>.jpg`` with labels ``root/labels/train/<stem>.cls``."""
        root = Path(root)
        paths = [_image_path(root / "images" / "train", stem) for stem in stems]
        labels = [read_label_file(root / "labels" / "train" / f"{s}.cls", num_classes) for s in stems]
        return cls(paths, labels, transform, num_classes, min_side)


def labelled_stems(root: str | Path) -> list[str]:
    """Stems of ``images/train`` that have a label file; the others cannot be trained on."""
    root = Path(root)
    label_dir = root / "labels" / "train"
    if not label_dir.is_dir():
        raise UserError(f"label folder {label_dir} does not exist; data.root must hold labels/train")
    labelled = {p.stem for p in label_dir.glob("*.cls")}
    stems = [p.stem for p in list_images(root / "images" / "train") if p.stem in labelled]
    if not stems:
        raise UserError(f"no image in {root / 'images' / 'train'} has a label file in {label_dir}")
    return stems


def _image_path(image_dir: Path, stem: str) -> Path:
    for suffix in IMAGE_SUFFIXES:
        if (path := image_dir / f"{stem}{suffix}").exists():
            return path
    raise UserError(f"image {image_dir / stem}.jpg does not exist")
