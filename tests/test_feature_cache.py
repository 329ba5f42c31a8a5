import os

import pytest
import torch
from PIL import Image

from coco_multilabel.data.datasets import CocoImages, labelled_stems, load_rgb
from coco_multilabel.data.feature_cache import FeatureCache, build_or_load, cache_folders, cache_key
from coco_multilabel.data.transforms import eval_transform
from coco_multilabel.models.backbones import torchvision_backbone
from coco_multilabel.models.checkpoints import load_model
from coco_multilabel.train import train

BACKBONE = {"_target_": "x.torchvision_backbone", "name": "mobilenet_v3_small", "weights": None}


@pytest.fixture
def images(tiny_root):
    return [tiny_root / "images" / "train" / f"{s}.jpg" for s in labelled_stems(tiny_root)[:6]]


def test_cache_key_changes_with_every_part_and_only_then(images, tmp_path):
    base = cache_key(BACKBONE, eval_transform(image_size=32), images, flip=False)
    assert cache_key(dict(BACKBONE), eval_transform(image_size=32), list(images), flip=False) == base
    assert cache_key({**BACKBONE, "name": "resnet18"}, eval_transform(image_size=32), images, False) != base
    assert (
        cache_key({**BACKBONE, "weights": "IMAGENET1K_V1"}, eval_transform(image_size=32), images, False)
        != base
    )
    assert cache_key(BACKBONE, eval_transform(image_size=64), images, False) != base
    assert cache_key(BACKBONE, eval_transform(image_size=32), images, True) != base
    assert cache_key(BACKBONE, eval_transform(image_size=32), images[:-1], False) != base
    copy = tmp_path / images[0].name
    copy.write_bytes(images[0].read_bytes())
    assert cache_key(BACKBONE, eval_transform(image_size=32), [copy, *images[1:]], False) != base
    changed = cache_key(BACKBONE, eval_transform(image_size=32), [copy, *images[1:]], False)
    os.utime(copy, ns=(1, 1))  # the same path, edited
    assert cache_key(BACKBONE, eval_transform(image_size=32), [copy, *images[1:]], False) != changed


def test_cached_features_equal_fresh_ones_and_are_reused(images, tmp_path):
    backbone = torchvision_backbone("mobilenet_v3_small").eval()

    def extract(images):  # uint8 images, as the transforms make them
        return backbone(images.float() / 255)

    transform = eval_transform(image_size=32)
    cache = build_or_load(tmp_path, images, extract, BACKBONE, transform, flip=True, batch_size=4)
    batch = torch.stack([CocoImages(images, transform=transform)[i][0] for i in range(len(images))])
    with torch.no_grad():
        fresh, flipped = extract(batch), extract(batch.flip(-1))
    assert cache.stems == [p.stem for p in images]
    torch.testing.assert_close(torch.from_numpy(cache.features[:]), fresh, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.from_numpy(cache.flipped[:]), flipped, atol=1e-5, rtol=1e-4)

    def must_not_run(_):
        raise AssertionError("a cache hit must not recompute features")

    again = build_or_load(tmp_path, images, must_not_run, BACKBONE, transform, flip=True)
    assert again.stems == cache.stems
    assert [p.name for p in cache_folders(tmp_path)] == [cache_key(BACKBONE, transform, images, True)]


def test_a_head_trained_from_the_cache_matches_one_trained_on_the_fly(train_cfg, tmp_path):
    # SGD: Adam would turn float noise in near-zero gradients into full-size steps
    same = ["schedule=probe", "model.dropout=0", "data.augment=false", "trainer.max_epochs=2",
            "optimizer=sgd", "model.tta=false"]  # fmt: skip
    on_the_fly = train(train_cfg(*same, "schedule.probe.inputs=images", run_dir=tmp_path / "fly"))
    cached = train(train_cfg(*same, f"data.cache_dir={tmp_path / 'cache'}", "data.cache_flip=false",
                             run_dir=tmp_path / "cached"))  # fmt: skip
    models = [load_model(tmp_path / run / "checkpoints" / "last.ckpt")
              for run in ("fly", "cached")]  # fmt: skip
    (folder,) = cache_folders(tmp_path / "cache")
    cache = FeatureCache.load(folder)
    features = torch.from_numpy(cache.features[:])
    with torch.no_grad():
        probs = [model(features).sigmoid() for model in models]
    torch.testing.assert_close(probs[0], probs[1], atol=1e-4, rtol=0)
    assert torch.equal(probs[0] > 0.5, probs[1] > 0.5)
    assert on_the_fly["val/loss"] == pytest.approx(cached["val/loss"], abs=1e-5)


def test_caching_needs_a_frozen_backbone(train_cfg):
    from coco_multilabel.errors import UserError

    with pytest.raises(UserError, match="schedule.finetune trains everything on cached features"):
        train(train_cfg("schedule.finetune.inputs=cache"))


def test_reduced_size_decode_keeps_the_requested_size(tmp_path):
    path = tmp_path / "big.jpg"
    Image.new("RGB", (800, 600), (200, 30, 30)).save(path)
    assert load_rgb(path).size == (800, 600)
    reduced = load_rgb(path, min_side=140)
    assert reduced.size == (200, 150)  # 1/4 scale: the smallest that keeps both sides >= 140
    assert load_rgb(path, min_side=300).size == (400, 300)
