"""The LightningDataModule: a seeded train/val split kept on disk, and the test images."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from coco_multilabel.classes import NUM_CLASSES
from coco_multilabel.data.datasets import CocoImages, check_data_root, collate_skipping_bad, labelled_stems
from coco_multilabel.data.feature_cache import CachedFeatures, build_or_load
from coco_multilabel.data.folds import load_or_make_fold_split
from coco_multilabel.data.split import load_or_make_split
from coco_multilabel.data.transforms import eval_transform, train_transform

log = logging.getLogger(__name__)


class CocoDataModule(L.LightningDataModule):
    """Labelled images split into train and val (submit reads the test images itself).

    After ``use_feature_cache(extract, cfg)`` it can serve what a frozen backbone part makes of
    each image, computed once (feature_cache.py), instead of the images: ``serve("cache")`` or
    ``serve("images")`` before each phase's fit. Cached val features come in (image, mirror image)
    pairs, for flip test-time augmentation; in training the mirror image's stands in for a flip.
    """

    def __init__(
        self,
        root: str | None = None,
        image_size: int = 224,
        eval_resize: str = "squash",
        batch_size: int = 32,
        num_workers: int | None = None,
        val_fraction: float = 0.1,
        seed: int = 0,
        split_file: str | None = None,
        augment: bool = True,
        crop_scale: tuple[float, float] = (0.5, 1.0),
        hflip_prob: float = 0.5,
        randaugment_ops: int = 0,
        randaugment_magnitude: int = 9,
        cutout_prob: float = 0.0,
        cache_dir: str = "outputs/cache",
        cache_flip: bool = True,
        num_classes: int = NUM_CLASSES,
        on_bad_image: str = "error",
        folds: int | None = None,
        fold: int = 0,
        folds_file: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["split_file"])
        self.split_file = Path(split_file) if split_file else None
        self.num_workers = default_num_workers() if num_workers is None else num_workers
        self.split: dict | None = None
        self._extract = None
        self._cache_cut: dict | None = None
        self.inputs = "images"
        # Counted here, in the main process: the workers that skip images cannot report to it.
        self.skipped_images = 0

    def use_feature_cache(self, extract, backbone_cfg: dict, cut: dict | None = None) -> None:
        """Build (or find) the cache of what ``extract`` (a model's ``trunk_features``) makes of the
        images at setup; ``cut`` says where in the backbone ``extract`` ends (see ``build_or_load``)."""
        self._extract, self._backbone_cfg, self._cache_cut = extract, backbone_cfg, cut

    def serve(self, inputs: str) -> None:
        """``cache`` or ``images``: what the next fit's dataloaders yield."""
        if inputs == "cache" and self._extract is None:
            raise ValueError("serve('cache') needs use_feature_cache() first")
        self.inputs = inputs

    def train_targets(self) -> torch.Tensor:
        """N x C multi-hot targets of the train split (for losses weighted by class frequency)."""
        return torch.stack(list(self.train_images.targets))

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        if stage not in ("fit", "validate", None) or self.split is not None:
            return
        root = check_data_root(hp.root)
        if hp.folds:  # cross-validation: val is fold ``fold`` of the folds file, train the others
            self.split = load_or_make_fold_split(
                self.split_file, root, labelled_stems(root), hp.folds, hp.fold, hp.folds_file, hp.seed
            )
        else:
            self.split = load_or_make_split(self.split_file, labelled_stems(root), hp.val_fraction, hp.seed)
        log.info("split: %d train, %d val images", len(self.split["train"]), len(self.split["val"]))
        evaluate = eval_transform(image_size=hp.image_size, resize=hp.eval_resize)
        augment = train_transform(
            image_size=hp.image_size, crop_scale=hp.crop_scale, hflip_prob=hp.hflip_prob,
            randaugment_ops=hp.randaugment_ops, randaugment_magnitude=hp.randaugment_magnitude,
            cutout_prob=hp.cutout_prob,
        )  # fmt: skip
        # decode at reduced scale, keeping enough pixels for the smallest random crop
        train_side = int(hp.image_size / hp.crop_scale[0] ** 0.5) if hp.augment else hp.image_size
        self.train_images = CocoImages.labelled(
            root,
            self.split["train"],
            augment if hp.augment else evaluate,
            hp.num_classes,
            min_side=train_side,
            on_bad_image=hp.on_bad_image,
        )
        self.val_images = CocoImages.labelled(
            root, self.split["val"], evaluate, hp.num_classes, hp.image_size, hp.on_bad_image
        )
        if self._extract is not None:
            images = sorted(self.train_images.image_paths + self.val_images.image_paths, key=lambda p: p.stem)
            cache = build_or_load(
                hp.cache_dir, images, self._extract, self._backbone_cfg, evaluate,
                flip=hp.cache_flip, batch_size=max(hp.batch_size, 64), num_workers=self.num_workers,
                cut=self._cache_cut,
            )  # fmt: skip
            flip = hp.hflip_prob if hp.augment else 0.0
            train, val = self.train_images, self.val_images
            self.train_features = CachedFeatures(cache, train.stems, train.targets, flip)
            self.val_features = CachedFeatures(cache, val.stems, val.targets, pairs=True)

    def on_before_batch_transfer(self, batch, dataloader_idx: int = 0):
        """Drop the ``kept`` mask of :func:`collate_skipping_bad`, counting what it left out."""
        inputs, targets, kept = batch
        self.skipped_images += int((~kept).sum())
        return inputs, targets

    def train_dataloader(self) -> DataLoader:
        train_set = self.train_features if self.inputs == "cache" else self.train_images
        drop_last = len(train_set) > self.hparams.batch_size
        return self._loader(train_set, shuffle=True, drop_last=drop_last)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_features if self.inputs == "cache" else self.val_images)

    def _loader(self, dataset, shuffle: bool = False, drop_last: bool = False) -> DataLoader:
        workers = 0 if isinstance(dataset, CachedFeatures) else self.num_workers  # memory-mapped rows
        return DataLoader(
            dataset,
            batch_size=self.hparams.batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
            collate_fn=collate_skipping_bad,
        )


def default_num_workers() -> int:
    """One worker per available core, at most 8: decoding keeps up with the model on these machines."""
    return min(8, len(os.sched_getaffinity(0)))
