"""The LightningDataModule: a seeded train/val split kept on disk, and the test images."""

from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from coco_multilabel.classes import NUM_CLASSES
from coco_multilabel.data.datasets import CocoImages, collate_skipping_bad, labelled_stems, list_images
from coco_multilabel.data.transforms import eval_transform, train_transform
from coco_multilabel.errors import UserError
from coco_multilabel.io import write_json_atomic

log = logging.getLogger(__name__)

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


class CocoDataModule(L.LightningDataModule):
    """Labelled images split into train/val, test images for prediction."""

    def __init__(
        self,
        root: str | None = None,
        image_size: int = 224,
        batch_size: int = 32,
        num_workers: int | None = None,
        val_fraction: float = 0.1,
        seed: int = 0,
        split_file: str | None = None,
        crop_scale: tuple[float, float] = (0.5, 1.0),
        hflip_prob: float = 0.5,
        num_classes: int = NUM_CLASSES,
        on_bad_image: str = "error",
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["split_file"])
        self.split_file = Path(split_file) if split_file else None
        self.num_workers = default_num_workers() if num_workers is None else num_workers
        self.split: dict | None = None
        # Counted here, in the main process: the workers that skip images cannot report to it.
        self.skipped_images = 0
        self.skipped_predict_indices: list[int] = []
        self._predicted = 0

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        if stage in ("fit", "validate", None) and self.split is None:
            root = check_data_root(hp.root)
            self.split = load_or_make_split(self.split_file, labelled_stems(root), hp.val_fraction, hp.seed)
            log.info("split: %d train, %d val images", len(self.split["train"]), len(self.split["val"]))
            self.train_set = CocoImages.labelled(
                root,
                self.split["train"],
                train_transform(image_size=hp.image_size, crop_scale=hp.crop_scale, hflip_prob=hp.hflip_prob),
                hp.num_classes,
                hp.on_bad_image,
            )
            self.val_set = CocoImages.labelled(
                root, self.split["val"], eval_transform(image_size=hp.image_size), hp.num_classes,
                hp.on_bad_image,
            )  # fmt: skip
        if stage == "predict":
            root = check_data_root(hp.root, need=("images/test",))
            images = list_images(root / "images" / "test")
            if not images:
                raise UserError(f"{root / 'images' / 'test'} holds no .jpg file: {DATA_ROOT_HELP}")
            self.predict_set = CocoImages(
                images, None, eval_transform(image_size=hp.image_size), on_bad_image=hp.on_bad_image
            )
            self.skipped_predict_indices, self._predicted = [], 0

    def on_before_batch_transfer(self, batch, dataloader_idx: int = 0):
        """Drop the ``kept`` mask of :func:`collate_skipping_bad`, counting what it left out."""
        images, targets, kept = batch
        skipped = torch.nonzero(~kept).flatten()
        self.skipped_images += len(skipped)
        if self.trainer is not None and self.trainer.predicting:
            # the predict loader is not shuffled: positions map to predict_set.stems
            self.skipped_predict_indices += (skipped + self._predicted).tolist()
            self._predicted += len(kept)
        return images, targets

    def train_dataloader(self) -> DataLoader:
        return self._loader(
            self.train_set, shuffle=True, drop_last=len(self.train_set) > self.hparams.batch_size
        )

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.predict_set)

    def _loader(self, dataset, shuffle: bool = False, drop_last: bool = False) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.hparams.batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            collate_fn=collate_skipping_bad,
        )


def default_num_workers() -> int:
    """One worker per available core, at most 8: decoding keeps up with the model on these machines."""
    return min(8, len(os.sched_getaffinity(0)))
