"""Options that compose: an option that would silently do nothing is an error before training,
naming the option and what to do instead."""

from __future__ import annotations

import inspect

from omegaconf import DictConfig

from coco_multilabel.callbacks.thresholds import ThresholdTuner
from coco_multilabel.data.datamodule import CocoDataModule
from coco_multilabel.errors import UserError
from coco_multilabel.training.schedule import Phase


def _defaults(cls) -> dict:
    return {k: p.default for k, p in inspect.signature(cls).parameters.items() if p.default is not p.empty}


def check_options(cfg: DictConfig, phases: list[Phase]) -> None:
    running = [p for p in phases if p.epochs]
    cached = [p for p in running if p.inputs == "cache"]
    on_images = [p for p in running if p.inputs == "images"]
    data, data_defaults = cfg.data, _defaults(CocoDataModule)
    names = ", ".join(p.name for p in running)
    augmentations = {
        "randaugment_ops": data.randaugment_ops,
        "cutout_prob": data.cutout_prob,
        "crop_scale": list(data.crop_scale),
    }
    for key, value in augmentations.items():
        if value == (list(data_defaults[key]) if key == "crop_scale" else data_defaults[key]):
            continue
        if not on_images:
            raise UserError(
                f"data.{key}={value} augments images, but every phase of this schedule ({names}) trains "
                "on cached features, which are computed once: drop it, or add a phase with inputs: images"
            )
        if not data.augment:
            raise UserError(f"data.{key}={value} does nothing with data.augment=false: drop one of them")
    if data.get("cache_on_device") and not cached:
        raise UserError(
            f"data.cache_on_device=true keeps the feature cache on the device, but no phase of this "
            f"schedule ({names}) reads the cache: drop it, or pick a schedule with inputs: cache"
        )
    if cached and not data.cache_flip:
        if cfg.model.tta:
            raise UserError(
                "model.tta=true averages each image with its mirror image, which the feature cache "
                "holds only with data.cache_flip=true: set it, or model.tta=false"
            )
        if data.augment and data.hflip_prob and not on_images:
            raise UserError(
                f"data.hflip_prob={data.hflip_prob} flips training images, but the feature cache holds "
                "no mirror images (data.cache_flip=false): set data.cache_flip=true, or data.hflip_prob=0"
            )
    scheduler = str((cfg.get("scheduler") or {}).get("_target_", ""))
    scaled = [p for p in running if p.lr_scale != 1 and p.train != "head"]
    if scheduler.endswith("OneCycleLR") and scaled:
        raise UserError(
            f"scheduler=onecycle gives every parameter group one max_lr, so schedule.{scaled[0].name}."
            f"lr_scale={scaled[0].lr_scale} would be lost: use scheduler=cosine (each phase warms up "
            "and decays on its own), or lr_scale: 1"
        )
    thresholds, tuner_defaults = cfg.thresholds, _defaults(ThresholdTuner)
    if thresholds.mode == "global":
        for key in ("min_positives", "shrinkage"):
            if thresholds[key] != tuner_defaults[key]:
                raise UserError(
                    f"thresholds.{key} applies to per-class thresholds only: add thresholds.mode=per_class, "
                    "or drop it"
                )
