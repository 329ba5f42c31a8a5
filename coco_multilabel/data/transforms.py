"""Train and eval transforms, as small presets in the style of torchvision's references.

They end in uint8 tensors: the model normalises with its backbone's own statistics, on its own
device, so a batch crosses to a GPU at a quarter of the float32 size and the preprocessing of a
checkpoint travels with it.
"""

from __future__ import annotations

from torchvision.transforms import v2 as T

from coco_multilabel.errors import UserError

CUTOUT_FILL = 128  # mid grey: close to every backbone's mean colour


def train_transform(
    *,
    image_size: int,
    crop_scale: tuple[float, float] = (0.5, 1.0),
    hflip_prob: float = 0.5,
    randaugment_ops: int = 0,
    randaugment_magnitude: int = 9,
    cutout_prob: float = 0.0,
) -> T.Compose:
    """Random resized crop + horizontal flip; RandAugment and cutout (random erasing) when asked.

    COCO objects are small and often near the border, so the crop keeps at least half the image by
    default (ImageNet recipes go down to 8%).
    """
    steps = [T.ToImage(), T.RandomResizedCrop(image_size, scale=tuple(crop_scale), antialias=True)]
    if hflip_prob > 0:
        steps.append(T.RandomHorizontalFlip(hflip_prob))
    if randaugment_ops > 0:
        steps.append(T.RandAugment(num_ops=randaugment_ops, magnitude=randaugment_magnitude))
    if cutout_prob > 0:
        steps.append(T.RandomErasing(p=cutout_prob, value=CUTOUT_FILL))
    return T.Compose(steps)


def eval_transform(*, image_size: int, resize: str = "squash") -> T.Compose:
    """``squash``: the whole image resized to a square, so objects near the left and right edges
    still count (on COCO photos +0.02 macro F1 over ``crop``); ``crop``: shorter side to
    ``image_size``, then the centre square, as ImageNet models are usually evaluated."""
    if resize == "squash":
        return T.Compose([T.ToImage(), T.Resize((image_size, image_size), antialias=True)])
    if resize == "crop":
        return T.Compose([T.ToImage(), T.Resize(image_size, antialias=True), T.CenterCrop(image_size)])
    raise UserError(f"data.eval_resize must be 'squash' or 'crop', got {resize!r}")


def checkpoint_eval_transform(checkpoint: dict, image_size: int | None = None) -> T.Compose:
    """The eval transform a checkpoint was validated with (its datamodule's size and resize mode;
    checkpoints from before ``eval_resize`` existed were centre-cropped)."""
    data = checkpoint.get("datamodule_hyper_parameters", {})
    return eval_transform(
        image_size=image_size or data.get("image_size", 224), resize=data.get("eval_resize", "crop")
    )
