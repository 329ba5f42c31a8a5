"""Train and eval transforms, as small presets in the style of torchvision's references."""

from __future__ import annotations

import torch
from torchvision.transforms import v2 as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def train_transform(
    *,
    image_size: int,
    crop_scale: tuple[float, float] = (0.5, 1.0),
    hflip_prob: float = 0.5,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> T.Compose:
    """Random resized crop + horizontal flip. COCO objects are small and often near the border, so
    the crop keeps at least half the image by default (ImageNet recipes go down to 8%)."""
    steps = [T.ToImage(), T.RandomResizedCrop(image_size, scale=tuple(crop_scale), antialias=True)]
    if hflip_prob > 0:
        steps.append(T.RandomHorizontalFlip(hflip_prob))
    steps += [T.ToDtype(torch.float32, scale=True), T.Normalize(mean, std)]
    return T.Compose(steps)


def eval_transform(
    *,
    image_size: int,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> T.Compose:
    """Resize the shorter side to ``image_size``, then center crop a square."""
    return T.Compose(
        [
            T.ToImage(),
            T.Resize(image_size, antialias=True),
            T.CenterCrop(image_size),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(mean, std),
        ]
    )
