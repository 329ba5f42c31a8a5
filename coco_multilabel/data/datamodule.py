"""The LightningDataModule: a seeded train/val split kept on disk, and the test images."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from coco_multilabel.classes import NUM_CLASSES
from coco_multilabel.data.datasets import (
    CocoImages,
    check_data_root,
    collate_skipping_bad,
    image_names,
    labelled_stems,
)
from coco_multilabel.data.feature_cache import CachedFeatures, CachedSplit, whole_batch
from coco_multilabel.data.folds import load_or_make_fold_split
from coco_multilabel.data.label_index import load_label_index
from coco_multilabel.data.split import load_or_make_split
from coco_multilabel.data.transforms import eval_transform, train_transform
from coco_multilabel.resources import job_cores

log = logging.getLogger(__name__)


class CocoDataModule(L.LightningDataModule):
    """Labelled images split into train and val (submit reads the test images itself).

    ``serve(features)`` makes the next fit's dataloaders yield the feature cache's rows of the split
    instead of the images (:class:`~coco_multilabel.data.feature_cache.CachedSplit`, built by the
    trainer before the phase that reads it: ``training/cache_build.py``); ``serve(None)`` the images
    again. Cached val rows come with their mirror image's, for flip test-time augmentation; in
    training the mirror image's stand in for a flip.
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
        cache_on_device: bool = False,
        folds: int | None = None,
        fold: int = 0,
        folds_file: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["split_file"])
        self.split_file = Path(split_file) if split_file else None
        self.split: dict | None = None
        self.features: CachedSplit | None = None  # served instead of the images when given
        # Counted here, in the main process: the workers that skip images cannot report to it.
        self.skipped_images = 0

    @property
    def num_workers(self) -> int:
        """``data.num_workers``, or by default the job's cores shared by the processes of this
        machine that load data (the DDP ranks Lightning starts here), known once a trainer runs."""
        if self.hparams.num_workers is not None:
            return self.hparams.num_workers
        return default_num_workers(processes_sharing_cores(self.trainer))

    def serve(self, features: CachedSplit | None) -> None:
        """What the next fit's dataloaders yield: ``features`` (the feature cache's rows of this
        split), or the images when None."""
        self.features = features

    def train_targets(self) -> torch.Tensor:
        """N x C multi-hot targets of the train split (for losses weighted by class frequency)."""
        return torch.from_numpy(self.train_images.targets).float()

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        if stage not in ("fit", "validate", None) or self.split is not None:
            return
        root = check_data_root(hp.root)
        index = load_label_index(root / "labels" / "train", hp.cache_dir, hp.num_classes)
        names = image_names(root / "images" / "train")
        stems = labelled_stems(root, index.stems, names)
        if hp.folds:  # cross-validation: val is fold ``fold`` of the folds file, train the others
            self.split = load_or_make_fold_split(
                self.split_file, index.classes, stems, hp.folds, hp.fold, hp.folds_file, hp.seed
            )
        else:
            self.split = load_or_make_split(self.split_file, stems, hp.val_fraction, hp.seed)
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
            index=index,
            names=names,
        )
        self.val_images = CocoImages.labelled(
            root, self.split["val"], evaluate, hp.num_classes, hp.image_size, hp.on_bad_image, index, names
        )

    def on_before_batch_transfer(self, batch, dataloader_idx: int = 0):
        """Drop the ``kept`` mask of :func:`collate_skipping_bad`, counting what it left out."""
        kept = batch.pop("kept")
        self.skipped_images += int((~kept).sum())
        return batch

    def train_dataloader(self) -> DataLoader:
        train_set = self.features.train if self.features else self.train_images
        drop_last = len(train_set) > self.hparams.batch_size
        return self._loader(train_set, train=True, drop_last=drop_last)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.features.val if self.features else self.val_images)

    def _loader(self, dataset, train: bool = False, drop_last: bool = False) -> DataLoader:
        cached = isinstance(dataset, CachedFeatures)
        workers = 0 if cached else self.num_workers  # whole batches of one array: no decoding to spread
        return DataLoader(
            dataset,
            batch_size=self.hparams.batch_size,
            shuffle=train,
            drop_last=drop_last,
            num_workers=workers,
            # the train loader's workers live through the run; val's start at each validation
            # and end with it, so no second set of workers sits idle through the training epochs
            persistent_workers=workers > 0 and train,
            pin_memory=torch.cuda.is_available() and not (cached and dataset.device is not None),
            collate_fn=whole_batch if cached else collate_skipping_bad,
        )


def default_num_workers(processes: int = 1) -> int:
    """One worker per core of the job (``resources.job_cores``: affinity, Slurm, cgroup quota),
    shared among the ``processes`` of this machine that load data. No fixed cap: a worker that
    runs ahead only waits, holding its two prefetched batches, while one worker delivers about 100
    photos a second at 224 px (``make bench``): an A100 at ResNet-50's published rate needs about
    20, more than a 16-core machine has (a cap of 8 fed it a third)."""
    return max(1, job_cores() // max(1, processes))


def processes_sharing_cores(trainer) -> int:
    """How many processes of this machine split its cores: the DDP ranks Lightning launched here
    (``trainer.num_devices``); one where a scheduler started each rank with cores of its own (srun)."""
    if trainer is None:
        return 1
    environment = getattr(trainer.strategy, "cluster_environment", None)
    if (
        environment is not None
        and environment.creates_processes_externally
        and os.environ.get("SLURM_CPUS_PER_TASK")
    ):
        return 1  # Slurm gave each task its own SLURM_CPUS_PER_TASK cores
    return max(1, trainer.num_devices)
