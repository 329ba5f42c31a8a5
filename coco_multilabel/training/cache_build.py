"""The feature cache, built where the model runs, once: through the trainer, on its accelerator.

``trainer.predict`` runs a small LightningModule (:class:`CacheBuilder`) over the images the cache
needs: under DDP each rank reads one contiguous block of them and writes its rows, by dataset
index, into the arrays rank 0 created; rank 0 then puts the ranks' lists of written rows together
and renames the finished folder into place. A file lock held by rank 0 from the check to the
rename makes a concurrent sweep job building the same cache wait and reuse it. The trunk runs at
the model's ``eval_precision`` (by default the trainer's: bf16 on GPUs that have it, fp16 on older
ones, float32 on CPUs), as validation and submit compute it from images.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from filelock import FileLock
from torch.utils.data import DataLoader, DistributedSampler

from coco_multilabel.data.checks import bad_headers
from coco_multilabel.data.datasets import CocoImages, collate_skipping_bad
from coco_multilabel.data.feature_cache import (
    CachedFeatures,
    CachedSplit,
    FeatureCache,
    RowWriter,
    build_or_load,
    cache_key,
    cache_lock,
    create_arrays,
    finish,
    is_complete,
    key_info,
    plan_cache,
    unfinished_folder,
)
from coco_multilabel.data.labels import CHECK_DATA_HINT
from coco_multilabel.errors import UserError
from coco_multilabel.training.precision import check_ranks_agree

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CacheRequest:
    """A feature cache to build or find: its folder, the images in their row order and how to read them."""

    folder: Path
    images: list[Path]
    transform: object
    flip: bool
    min_side: int
    batch_size: int
    num_workers: int
    on_bad_image: str
    backbone_cfg: dict
    cut: dict | None

    @property
    def stems(self) -> list[str]:
        return [p.stem for p in self.images]


def cache_request(datamodule, model) -> CacheRequest:
    """What the feature cache of ``datamodule``'s split (after ``setup``) must hold for ``model``'s
    frozen trunk, and where it is kept."""
    hp, backbone_cfg, cut = datamodule.hparams, model.hparams.backbone, model.trunk_cut()
    train, val = datamodule.train_images, datamodule.val_images
    images = sorted(train.image_paths + val.image_paths, key=lambda p: p.stem)
    key = cache_key(backbone_cfg, val.transform, images, hp.cache_flip, cut, hp.image_size)
    return CacheRequest(
        folder=Path(hp.cache_dir) / key, images=images, transform=val.transform, flip=hp.cache_flip,
        min_side=hp.image_size, batch_size=max(hp.batch_size, 64), num_workers=datamodule.num_workers,
        on_bad_image=hp.on_bad_image, backbone_cfg=backbone_cfg, cut=cut,
    )  # fmt: skip


def cached_split(cache: FeatureCache, datamodule, device=None) -> CachedSplit:
    """``cache``'s rows of ``datamodule``'s split, for it to serve: train's mirror image's served as
    often as a flip would be, val's beside the image's; on ``device`` with data.cache_on_device."""
    hp = datamodule.hparams
    device = device if hp.cache_on_device else None
    flip = hp.hflip_prob if hp.augment else 0.0
    train, val = datamodule.train_images, datamodule.val_images
    return CachedSplit(
        CachedFeatures(cache, train.stems, train.targets, flip, device=device),
        CachedFeatures(cache, val.stems, val.targets, pairs=True, device=device),
    )


def build_here(model, datamodule) -> CachedSplit:
    """Find or build the cache in this process, without a trainer (``make bench``)."""
    datamodule.setup("fit")
    request = cache_request(datamodule, model)
    cache = build_or_load(
        request.folder.parent, request.images, model.trunk_features, request.backbone_cfg,
        request.transform, flip=request.flip, batch_size=request.batch_size,
        num_workers=request.num_workers, cut=request.cut, on_bad_image=request.on_bad_image,
        min_side=request.min_side,
    )  # fmt: skip
    return cached_split(cache, datamodule)


def build_feature_cache(trainer: L.Trainer, model, datamodule) -> CachedSplit:
    """Find or build the feature cache of ``datamodule``'s split with ``model``'s frozen trunk; its
    rows of the split, for the datamodule to serve. Every rank calls it; a single process that finds
    the cache skips the trainer altogether."""
    datamodule.setup("fit")
    datamodule.trainer = trainer  # as fit will: its default workers split the cores among the ranks
    request = cache_request(datamodule, model)
    if trainer.world_size > 1 or not is_complete(request.folder):
        log.info(
            "feature cache of %d images (%s): finding or building it on %d %s device(s)",
            len(request.images), request.folder, trainer.world_size, trainer.strategy.root_device.type,
        )  # fmt: skip
        if not is_complete(request.folder):
            plan = plan_cache(request.folder, len(request.images), sample_output(model, request),
                              request.flip, share=trainer.num_devices)  # fmt: skip
            if trainer.is_global_zero:
                log.info("%s", plan.line())
            plan.check()  # before any image is read: a cache that cannot fit is refused now
        check_images(request)
        builder = CacheBuilder(model, request)
        try:
            trainer.predict(builder, return_predictions=False)
            builder.finish(trainer)
        finally:
            builder.abandon()
    else:
        log.info("feature cache hit: %s", request.folder)
    cache = FeatureCache.load(request.folder, share=trainer.num_devices)
    return cached_split(cache, datamodule, device=trainer.strategy.root_device)


def check_images(request) -> None:
    """Under ``data.on_bad_image=error``, name an unreadable image before any work is spent on the
    cache (a header check, seconds for the challenge's images) rather than minutes into the build."""
    if request.on_bad_image != "error" or is_complete(request.folder):
        return
    bad = [(path, why) for path, why in bad_headers([Path(p) for p in request.images]) if why != "not_jpeg"]
    if bad:  # a PNG named .jpg decodes: only what the build would stop at
        path, problem = bad[0]
        raise UserError(
            f"{len(bad)} of the images the feature cache needs cannot be read, the first {path} "
            f"({problem}); {CHECK_DATA_HINT}, or leave them out with data.on_bad_image=skip"
        )


def sample_output(model, request) -> torch.Tensor:
    """The trunk's output for one blank image: the cache's row shape and storage type."""
    size = request.min_side
    blank = torch.zeros(1, 3, size, size, dtype=torch.uint8, device=model.mean.device)
    return model.trunk_features(blank)


class ContiguousShards(DistributedSampler):
    """Rank r reads one contiguous block of the dataset, no image twice and none padded in: its rows
    are one region of each array. A DistributedSampler, so Lightning keeps it as it is."""

    def __init__(self, dataset, num_replicas: int, rank: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        n = len(dataset)
        self.start, self.stop = n * rank // num_replicas, n * (rank + 1) // num_replicas
        self.num_samples = self.stop - self.start

    def __iter__(self):
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.num_samples


class CacheBuilder(L.LightningModule):
    """What ``trainer.predict`` runs to build a cache: ``model.trunk_features`` of each image (and of
    its mirror image), written by dataset index; nothing is returned to the trainer."""

    progress_description = "building the feature cache"  # what the progress lines call it

    def __init__(self, model, request):
        super().__init__()
        self.model, self.request = model, request
        self.tmp = None  # the unfinished folder all ranks write to; None: nothing to build
        self.lock: FileLock | None = None
        self.writer: RowWriter | None = None

    def setup(self, stage: str) -> None:
        """Rank 0 decides, under the lock, whether to build, and creates the arrays; all ranks learn it."""
        check_ranks_agree(self.trainer)
        plan = None
        if self.trainer.is_global_zero:
            self.lock = cache_lock(self.request.folder)
            self.lock.acquire()
            if is_complete(self.request.folder):  # built meanwhile, by another run of a sweep
                self.lock.release()
                self.lock = None
            else:
                tmp = unfinished_folder(self.request.folder)
                create_arrays(
                    tmp, len(self.request.images), sample_output(self.model, self.request), self.request.flip
                )
                plan = str(tmp)
        plan = self.trainer.strategy.broadcast(plan, src=0)
        self.tmp = None if plan is None else type(self.request.folder)(plan)

    def predict_dataloader(self) -> DataLoader:
        request = self.request
        images = request.images if self.tmp is not None else []
        dataset = CocoImages(
            images, transform=request.transform, min_side=request.min_side, on_bad_image=request.on_bad_image
        )
        return DataLoader(
            dataset,
            batch_size=request.batch_size,
            sampler=ContiguousShards(dataset, self.trainer.world_size, self.trainer.global_rank),
            num_workers=request.num_workers if images else 0,
            collate_fn=collate_skipping_bad,
            pin_memory=self.trainer.strategy.root_device.type == "cuda",
            generator=torch.Generator(),  # leave the global RNG, and so the training run, untouched
        )

    def on_predict_start(self) -> None:
        if self.tmp is not None:
            self.writer = RowWriter(self.tmp, self.trainer.global_rank)

    def predict_step(self, batch, batch_idx):
        images, indices = batch["images"], batch["indices"]
        features = self.model.trunk_features(images)  # at the model's eval precision, its own autocast
        flipped = self.model.trunk_features(images.flip(-1)) if self.request.flip else None
        self.writer.write(indices.cpu().numpy(), features, flipped)
        return len(indices)  # not collected (return_predictions=False); None would be warned about

    def on_predict_end(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def finish(self, trainer: L.Trainer) -> None:
        """After ``trainer.predict``: rank 0 completes the folder once every rank has written its rows."""
        if self.tmp is None:
            return
        trainer.strategy.barrier("feature cache rows written")
        if trainer.is_global_zero:
            request = self.request
            info = key_info(request.backbone_cfg, request.cut, request.transform)
            finish(self.tmp, request.folder, request.stems, trainer.world_size, info)
        trainer.strategy.barrier("feature cache complete")

    def abandon(self) -> None:
        """Whatever happened: remove an unfinished folder (rank 0, which made it) and let go of the lock."""
        if self.lock is not None:
            if self.tmp is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)
            self.lock.release()
            self.lock = None
