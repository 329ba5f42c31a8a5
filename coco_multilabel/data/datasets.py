"""Datasets over the challenge layout: ``images/<split>/<stem>.jpg`` and ``labels/train/<stem>.cls``.

A batch says what it holds, by its keys: ``images`` (uint8, N x 3 x H x W), or ``features`` (what
the feature cache keeps of them, ``data/feature_cache.py``) with, for flip TTA, ``mirror_features``
(their mirror images'); ``targets`` (N x C multi-hot), ``indices`` (rows of the dataset) and
``kept`` (which samples of the batch were readable). The model reads the keys, never the shapes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from coco_multilabel.data.images import decode_image
from coco_multilabel.data.label_index import LabelIndex
from coco_multilabel.data.labels import CHECK_DATA_HINT, read_label_file
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
    return [image_dir / name for name in image_names(image_dir).values()]


def image_names(image_dir: str | Path) -> dict[str, str]:
    """``{stem: file name}`` of the JPEG files of ``image_dir``, sorted by stem (one scan, no stat)."""
    try:
        with os.scandir(image_dir) as entries:
            names = [e.name for e in entries if e.name.endswith(IMAGE_SUFFIXES) and not e.is_dir()]
    except FileNotFoundError:
        raise UserError(f"image folder {image_dir} does not exist") from None
    stems = [os.path.splitext(name)[0] for name in names]  # no Path objects: 65,000 of them take seconds
    return dict(sorted(zip(stems, names, strict=True)))


class CocoImages(Dataset):
    """Images with multi-hot targets (``labels`` or ``targets`` given) or an empty target (test images).

    The files are one folder and a numpy array of names, the targets one N x C bool array: a
    DataLoader worker forked from a process holding 65,000 Python objects would copy every page
    they live on as it touches their reference counts. Images are decoded by ``decode_image``
    (uint8 tensors); ``min_side`` decodes JPEGs at a reduced scale (see ``load_rgb``).
    ``on_bad_image="skip"`` turns an unreadable image into ``None``
    instead of an error; :func:`collate_skipping_bad` drops it from the batch and says where it was.
    """

    def __init__(
        self,
        image_paths: list[Path],
        labels: list[list[int]] | None = None,
        transform: Callable | None = None,
        num_classes: int = 80,
        min_side: int | None = None,
        on_bad_image: str = "error",
        targets: np.ndarray | None = None,
        folder: Path | None = None,
    ):
        """``image_paths``: paths, or with ``folder`` the file names in it."""
        if labels is not None and len(labels) != len(image_paths):
            raise ValueError("one label list per image is needed")
        if on_bad_image not in BAD_IMAGE_POLICIES:
            raise UserError(
                f"data.on_bad_image must be one of {', '.join(BAD_IMAGE_POLICIES)}, got {on_bad_image!r}"
            )
        if folder is not None:
            self.folder, self.names = Path(folder), np.array(list(image_paths), dtype=str)
        else:
            paths = [Path(p) for p in image_paths]
            parents = {p.parent for p in paths}
            self.folder = parents.pop() if len(parents) == 1 else None
            self.names = np.array([p.name if self.folder else str(p) for p in paths], dtype=str)
        if labels is not None:
            targets = np.zeros((len(self.names), num_classes), dtype=bool)
            for row, classes in enumerate(labels):
                targets[row, classes] = True
        self.targets = targets  # N x C bool, or None
        self.transform = transform
        self.min_side = min_side
        self.on_bad_image = on_bad_image

    @property
    def image_paths(self) -> list[Path]:
        return [self.path(i) for i in range(len(self))]

    def path(self, index: int) -> Path:
        name = str(self.names[index])
        return self.folder / name if self.folder is not None else Path(name)

    @property
    def stems(self) -> list[str]:
        return [os.path.splitext(os.path.basename(name))[0] for name in self.names.tolist()]

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int):
        """``{images, targets, indices}`` of one image: the index lets a DDP gather drop duplicates and
        keep order."""
        try:
            image = decode_image(self.path(index), self.min_side)
        except UserError:
            if self.on_bad_image == "skip":
                log.debug("skipping unreadable image %s", self.path(index))
                return None
            raise
        if self.transform is not None:
            image = self.transform(image)
        target = (
            torch.zeros(0) if self.targets is None else torch.from_numpy(self.targets[index].astype("f4"))
        )
        return {"images": image, "targets": target, "indices": index}

    @classmethod
    def labelled(
        cls,
        root: str | Path,
        stems: list[str],
        transform=None,
        num_classes: int = 80,
        min_side: int | None = None,
        on_bad_image: str = "error",
        index: LabelIndex | None = None,
        names: dict[str, str] | None = None,
    ):
        """Images ``root/images/train/<stem>.jpg`` with labels ``root/labels/train/<stem>.cls``, from
        the labels index and the folder's ``image_names`` when given, else read file by file."""
        root = Path(root)
        image_dir = root / "images" / "train"
        if names is None:
            names = {stem: _image_path(image_dir, stem).name for stem in stems}
        missing = [s for s in stems if s not in names]
        if missing:
            raise UserError(f"image {image_dir / missing[0]}.jpg does not exist; {CHECK_DATA_HINT}")
        files = [names[s] for s in stems]
        if index is not None:
            targets = index.targets_of(stems)
            return cls(files, None, transform, num_classes, min_side, on_bad_image, targets, folder=image_dir)
        labels = [read_label_file(root / "labels" / "train" / f"{s}.cls", num_classes) for s in stems]
        return cls(files, labels, transform, num_classes, min_side, on_bad_image, folder=image_dir)


def collate_skipping_bad(samples: list) -> dict[str, torch.Tensor]:
    """``{images, targets, indices, kept}``: the readable samples, their dataset indices, and which
    positions of the batch they were."""
    kept = torch.tensor([sample is not None for sample in samples])
    good = [sample for sample in samples if sample is not None]
    if not good:
        raise UserError(
            f"all {len(samples)} images of a batch are unreadable; the data is badly damaged: "
            + CHECK_DATA_HINT
        )
    return {**default_collate(good), "kept": kept}


def labelled_stems(root: str | Path, label_stems=None, names: dict[str, str] | None = None) -> list[str]:
    """Stems of ``images/train`` that have a label file; the others cannot be trained on.

    ``label_stems`` (the labels index's) and ``names`` (``image_names``) spare a scan each."""
    root = Path(root)
    label_dir = root / "labels" / "train"
    if not label_dir.is_dir():
        raise UserError(f"label folder {label_dir} does not exist; data.root must hold labels/train")
    if label_stems is None:
        with os.scandir(label_dir) as entries:
            label_stems = [e.name[:-4] for e in entries if e.name.endswith(".cls") and not e.is_dir()]
    labelled = set(map(str, label_stems))
    images = list(names if names is not None else image_names(root / "images" / "train"))
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
