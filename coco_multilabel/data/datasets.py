"""Datasets over the challenge layout: ``images/<split>/<stem>.jpg`` and ``labels/train/<stem>.cls``."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import Dataset, default_collate

from coco_multilabel.data.images import load_rgb
from coco_multilabel.data.labels import CHECK_DATA_HINT, read_label_file, to_multi_hot
from coco_multilabel.errors import UserError

log = logging.getLogger(__name__)

BAD_IMAGE_POLICIES = ("error", "skip")  # data.on_bad_image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".JPG", ".JPEG")


DATA_ROOT_HELP = (
    "set data.root to the folder unpacked from ms-coco.zip, the one holding images/train, "
    "labels/train and images/test (e.g. `make train DATA=data/ms-coco`)"
)


def check_data_root(
    root: str | Path | None, need: tuple[str, ...] = ("images/train", "labels/train")
) -> Path:
    """``root`` as a Path, or a UserError that says which folder was expected."""
    if root in (None, "", "???"):
        raise UserError(f"data.root is not set: {DATA_ROOT_HELP}")
    root = Path(root).expanduser()
    for sub in need:
        if not (root / sub).is_dir():
            raise UserError(f"{root / sub} is not a folder: {DATA_ROOT_HELP}")
    return root


def list_images(image_dir: str | Path) -> list[Path]:
    """The JPEG files of ``image_dir``, sorted by stem."""
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise UserError(f"image folder {image_dir} does not exist")
    files = (p for p in image_dir.iterdir() if p.suffix in IMAGE_SUFFIXES and not p.is_dir())  # x.jpg/ isn't
    return sorted(files, key=lambda p: p.stem)


class CocoImages(Dataset):
    """Images with multi-hot targets (``labels`` given) or with an empty target (test images).

    ``min_side`` decodes JPEGs at a reduced scale (see ``load_rgb``). ``on_bad_image="skip"`` turns
    an unreadable image into ``None`` instead of an error; :func:`collate_skipping_bad` drops it
    from the batch and says where it was.
    """

    def __init__(
        self,
        image_paths: list[Path],
        labels: list[list[int]] | None = None,
        transform: Callable | None = None,
        num_classes: int = 80,
        min_side: int | None = None,
        on_bad_image: str = "error",
    ):
        if labels is not None and len(labels) != len(image_paths):
            raise ValueError("one label list per image is needed")
        if on_bad_image not in BAD_IMAGE_POLICIES:
            raise UserError(
                f"data.on_bad_image must be one of {', '.join(BAD_IMAGE_POLICIES)}, got {on_bad_image!r}"
            )
        self.image_paths = list(image_paths)
        self.targets = None if labels is None else [to_multi_hot(c, num_classes) for c in labels]
        self.transform = transform
        self.min_side = min_side
        self.on_bad_image = on_bad_image

    @property
    def stems(self) -> list[str]:
        return [p.stem for p in self.image_paths]

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        try:
            image = load_rgb(self.image_paths[index], self.min_side)
        except UserError:
            if self.on_bad_image == "skip":
                log.debug("skipping unreadable image %s", self.image_paths[index])
                return None
            raise
        if self.transform is not None:
            image = self.transform(image)
        target = torch.zeros(0) if self.targets is None else self.targets[index]
        return image, target

    @classmethod
    def labelled(
        cls,
        root: str | Path,
        stems: list[str],
        transform=None,
        num_classes: int = 80,
        min_side: int | None = None,
        on_bad_image: str = "error",
    ):
        """Images ``root/images/train/<stem>.jpg`` with labels ``root/labels/train/<stem>.cls``."""
        root = Path(root)
        paths = [_image_path(root / "images" / "train", stem) for stem in stems]
        labels = [read_label_file(root / "labels" / "train" / f"{s}.cls", num_classes) for s in stems]
        return cls(paths, labels, transform, num_classes, min_side, on_bad_image)


def collate_skipping_bad(samples: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(images, targets, kept)``: the readable samples, and which positions of the batch they were."""
    kept = torch.tensor([sample is not None for sample in samples])
    good = [sample for sample in samples if sample is not None]
    if not good:
        raise UserError(
            f"all {len(samples)} images of a batch are unreadable; the data is badly damaged: "
            + CHECK_DATA_HINT
        )
    images, targets = default_collate(good)
    return images, targets, kept


def labelled_stems(root: str | Path) -> list[str]:
    """Stems of ``images/train`` that have a label file; the others cannot be trained on."""
    root = Path(root)
    label_dir = root / "labels" / "train"
    if not label_dir.is_dir():
        raise UserError(f"label folder {label_dir} does not exist; data.root must hold labels/train")
    labelled = {p.stem for p in label_dir.glob("*.cls") if not p.is_dir()}
    images = [p.stem for p in list_images(root / "images" / "train")]
    stems = [stem for stem in images if stem in labelled]
    if len(stems) < len(images):
        first = next(stem for stem in images if stem not in labelled)
        log.warning(
            "%d images of %s have no label file and are left out (first: %s); %s",
            len(images) - len(stems), root / "images" / "train", first, CHECK_DATA_HINT,
        )  # fmt: skip
    if not stems:
        raise UserError(f"no image in {root / 'images' / 'train'} has a label file in {label_dir}")
    return stems


def _image_path(image_dir: Path, stem: str) -> Path:
    for suffix in IMAGE_SUFFIXES:
        if (path := image_dir / f"{stem}{suffix}").exists():
            return path
    raise UserError(f"image {image_dir / stem}.jpg does not exist; {CHECK_DATA_HINT}")
