import pytest
import torch
from PIL import Image
from torchvision.transforms import v2 as T

from coco_multilabel.data.transforms import checkpoint_eval_transform, eval_transform, train_transform
from coco_multilabel.errors import UserError


def wide_image() -> Image.Image:
    """A 4:3 image whose left eighth is red: a centre crop cuts the red off, squashing keeps it."""
    image = Image.new("RGB", (64, 48), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 8, 48))
    return image


def test_squash_keeps_the_whole_image_and_crop_keeps_its_centre():
    squashed = eval_transform(image_size=32, resize="squash")(wide_image())
    cropped = eval_transform(image_size=32, resize="crop")(wide_image())
    assert squashed.shape == cropped.shape == (3, 32, 32)
    red = lambda x: (x[0] > x[2]).float().mean()  # noqa: E731
    assert red(squashed) == pytest.approx(0.125, abs=0.04)
    assert red(cropped) < 0.05
    with pytest.raises(UserError, match="eval_resize"):
        eval_transform(image_size=32, resize="letterbox")


def test_old_checkpoints_keep_the_centre_crop_they_were_validated_with():
    old = checkpoint_eval_transform({"datamodule_hyper_parameters": {"image_size": 32}})
    assert any(isinstance(t, T.CenterCrop) for t in old.transforms)
    data = {"image_size": 32, "eval_resize": "squash"}
    new = checkpoint_eval_transform({"datamodule_hyper_parameters": data})
    assert not any(isinstance(t, T.CenterCrop) for t in new.transforms)


def test_randaugment_and_cutout_only_when_asked():
    plain = train_transform(image_size=32)
    assert not any(isinstance(t, (T.RandAugment, T.RandomErasing)) for t in plain.transforms)
    strong = train_transform(image_size=32, randaugment_ops=2, cutout_prob=1.0)
    kinds = [type(t) for t in strong.transforms]
    assert T.RandAugment in kinds and kinds[-1] is T.RandomErasing  # erasing after normalising: fills 0
    torch.manual_seed(0)
    out = strong(wide_image())
    assert out.shape == (3, 32, 32) and (out == 0).all(0).any()  # an erased rectangle
