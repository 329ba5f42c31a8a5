import os

import numpy as np
import pytest
import torch
from PIL import Image

from coco_multilabel.data.datasets import CocoImages, labelled_stems
from coco_multilabel.data.feature_cache import FeatureCache, build_or_load, cache_folders, cache_key
from coco_multilabel.data.images import load_rgb
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
    batch = torch.stack([CocoImages(images, transform=transform)[i]["images"] for i in range(len(images))])
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


@pytest.mark.slow
def test_a_head_trained_from_the_cache_matches_one_trained_on_the_fly(train_cfg, tmp_path):
    # SGD: Adam would turn float noise in near-zero gradients into full-size steps
    same = ["schedule=probe", "model.dropout=0", "data.augment=false", "trainer.max_epochs=2",
            "optimizer=sgd", "model.tta=false"]  # fmt: skip
    on_the_fly = train(train_cfg(*same, "schedule.probe.inputs=images", run_dir=tmp_path / "fly"))
    cached = train(train_cfg(*same, f"data.cache_dir={tmp_path / 'cache'}", "data.cache_flip=false",
                             run_dir=tmp_path / "cached"))  # fmt: skip
    resident = train(train_cfg(*same, f"data.cache_dir={tmp_path / 'cache'}", "data.cache_flip=false",
                               "data.cache_on_device=true", run_dir=tmp_path / "resident"))  # fmt: skip
    assert resident["val/loss"] == cached["val/loss"]  # the same cache, served from the device's copy
    models = [load_model(tmp_path / run / "checkpoints" / "last.ckpt")
              for run in ("fly", "cached")]  # fmt: skip
    (folder,) = cache_folders(tmp_path / "cache")
    cache = FeatureCache.load(folder)
    features = torch.from_numpy(cache.features[:])
    with torch.no_grad():
        probs = [model(features=features).sigmoid() for model in models]
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


@pytest.mark.slow
def test_ddp_builds_the_cache_once_across_ranks_and_every_rank_reads_the_same_rows(tiny_root, tmp_path):
    import json

    from coco_multilabel.data.datasets import collate_skipping_bad
    from tests.helpers import cli

    args = [
        f"data.root={tiny_root}", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
        "trainer.precision=32-true", "schedule=probe", "data.batch_size=8", "model.tta=false",
        f"data.cache_dir={tmp_path / 'cache'}", "+callbacks.record._target_=tests.helpers.CacheRecorder",
        f"+callbacks.record.folder={tmp_path / 'record'}",
    ]  # fmt: skip

    def records(name):
        return [
            [json.loads(line) for line in path.read_text().splitlines()]
            if (path := tmp_path / "record" / f"{name}.rank{r}.jsonl").exists()
            else []
            for r in (0, 1)
        ]

    first = cli(*args, f"hydra.run.dir={tmp_path / 'first'}", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    built = [[i for batch in rank for i in batch["indices"]] for rank in records("predict")]
    assert built[0] and built[1]  # both ranks computed a share
    assert sorted(built[0] + built[1]) == list(range(48))  # every image once, none twice
    second = cli(*args, f"hydra.run.dir={tmp_path / 'second'}", cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert [[i for b in rank for i in b["indices"]] for rank in records("predict")] == built  # reused
    served = [record for rank in records("train") for record in rank]
    assert len(served) == 4 and all(r == served[0] for r in served)  # 2 runs x 2 ranks, the same rows

    (folder,) = cache_folders(tmp_path / "cache")
    cache = FeatureCache.load(folder)
    model = load_model(tmp_path / "first" / "checkpoints" / "last.ckpt").eval()  # the trunk stayed frozen
    dataset = CocoImages([tiny_root / "images" / "train" / f"{s}.jpg" for s in cache.stems],
                         transform=eval_transform(image_size=32), min_side=32)  # fmt: skip
    images = collate_skipping_bad([dataset[i] for i in range(len(dataset))])["images"]
    torch.testing.assert_close(
        torch.from_numpy(np.array(cache.features)), model.trunk_features(images), atol=1e-5, rtol=1e-4
    )
    torch.testing.assert_close(
        torch.from_numpy(np.array(cache.flipped)), model.trunk_features(images.flip(-1)), atol=1e-5, rtol=1e-4
    )


def written_cache(tmp_path, n=10, present=None):
    """A finished cache folder of ``n`` float16 3 x 2 x 2 maps (and mirror maps), written as the
    builder writes them: arrays made from a sample, rows by index from two 'ranks'."""
    from coco_multilabel.data.feature_cache import RowWriter, create_arrays, finish

    values = torch.randn(n, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    tmp, folder = tmp_path / ".c.tmp", tmp_path / "c"
    create_arrays(tmp, n, values[:1], flip=True)
    keep = list(range(n)) if present is None else present
    for rank, part in enumerate((keep[: len(keep) // 2], keep[len(keep) // 2 :])):
        writer = RowWriter(tmp, rank)
        writer.write(part, values[part], -values[part])
        writer.close()
    finish(tmp, folder, [f"s{i}" for i in range(n)], 2, {})
    return folder, values


@pytest.mark.parametrize("in_memory", [True, False])
@pytest.mark.parametrize("device", [None, "cpu"])
def test_whole_batches_equal_row_by_row_reads(tmp_path, in_memory, device):
    from coco_multilabel.data.feature_cache import CachedFeatures

    folder, values = written_cache(tmp_path)
    cache = FeatureCache.load(folder, in_memory=in_memory)
    assert isinstance(cache.features, np.memmap) != in_memory and cache.features.dtype == np.float16
    stems = ["s7", "s2", "s5", "s0", "s9"]
    targets = np.eye(5, 80, dtype=bool)
    positions = [4, 0, 3, 1]  # unsorted, as a shuffled sampler draws them
    for kwargs, expected in (({}, values), ({"flip_prob": 1.0}, -values)):
        dataset = CachedFeatures(cache, stems, targets, device=device, **kwargs)
        batch = dataset.__getitems__(positions)
        x, y = batch["features"], batch["targets"]
        rows = [dataset[i] for i in positions]
        assert x.dtype == torch.float16 and torch.equal(x, torch.stack([r["features"] for r in rows]))
        assert torch.equal(y, torch.stack([r["targets"] for r in rows]))
        assert batch["indices"].tolist() == positions and "mirror_features" not in batch
        assert batch["kept"].all() and torch.equal(x.float(), expected[[9, 7, 0, 2]].half().float())
    pairs = CachedFeatures(cache, stems, targets, pairs=True, device=device)
    batch = pairs.__getitems__(positions)
    x, mirror = batch["features"], batch["mirror_features"]
    assert x.shape == mirror.shape == (4, 3, 2, 2)
    assert torch.equal(x, torch.stack([pairs[i]["features"] for i in positions]))
    assert torch.equal(mirror, torch.stack([pairs[i]["mirror_features"] for i in positions]))
    assert torch.equal(mirror, -x)


def test_rows_of_unreadable_images_are_left_out(tmp_path):
    from coco_multilabel.data.feature_cache import CachedFeatures

    folder, values = written_cache(tmp_path, n=6, present=[0, 1, 3, 4, 5])  # image 2 could not be read
    cache = FeatureCache.load(folder)
    assert cache.present.tolist() == [True, True, False, True, True, True]
    dataset = CachedFeatures(cache, ["s1", "s2", "s3"], np.eye(3, 80, dtype=bool))
    assert len(dataset) == 2
    batch = dataset.__getitems__([0, 1])
    x, y = batch["features"], batch["targets"]
    assert torch.equal(x.float(), values[[1, 3]].half().float()) and y[:, :3].argmax(1).tolist() == [0, 2]


def test_a_bad_image_is_skipped_by_the_cache_build_when_told_to(images, tmp_path):
    from coco_multilabel.errors import UserError

    damaged = tmp_path / "images"
    damaged.mkdir()
    for path in images:
        (damaged / path.name).write_bytes(path.read_bytes())
    (damaged / images[2].name).write_bytes(b"\xff\xd8 truncated")
    paths = [damaged / p.name for p in images]
    transform = eval_transform(image_size=32)

    def extract(batch):
        return batch.float().mean((2, 3))

    with pytest.raises(UserError):
        build_or_load(tmp_path / "c1", paths, extract, BACKBONE, transform)
    assert not cache_folders(tmp_path / "c1")  # nothing half-built left behind
    cache = build_or_load(tmp_path / "c2", paths, extract, BACKBONE, transform, on_bad_image="skip")
    assert cache.present.tolist() == [True, True, False, True, True, True]


def test_two_jobs_wanting_the_same_cache_build_it_once(images, tmp_path):
    import threading
    import time

    from coco_multilabel.data.feature_cache import cache_lock

    calls, transform = [], eval_transform(image_size=32)

    def extract(batch):
        calls.append(len(batch))
        return batch.float().mean((2, 3))

    results = []

    def job():
        results.append(build_or_load(tmp_path, images, extract, BACKBONE, transform, batch_size=4))

    key_folder = tmp_path / cache_key(BACKBONE, transform, images, False)
    with cache_lock(key_folder):  # a third job is building: both wait for it
        jobs = [threading.Thread(target=job) for _ in range(2)]
        for thread in jobs:
            thread.start()
        time.sleep(0.5)
        assert all(thread.is_alive() for thread in jobs) and not calls
    for thread in jobs:
        thread.join(timeout=120)
    assert sum(calls) == len(images)  # one of them built it, the other found it
    assert [r.stems for r in results] == [[p.stem for p in images]] * 2
    np.testing.assert_array_equal(results[0].features, results[1].features)


def test_a_bad_image_is_named_before_the_trainer_builds_the_cache(images, tmp_path):
    from types import SimpleNamespace

    from coco_multilabel.errors import UserError
    from coco_multilabel.training.cache_build import check_images

    damaged = tmp_path / "images"
    damaged.mkdir()
    for path in images:
        (damaged / path.name).write_bytes(path.read_bytes())
    (damaged / images[2].name).write_bytes(images[2].read_bytes()[:200])  # cut short: no end marker
    paths = [damaged / p.name for p in images]
    request = SimpleNamespace(images=paths, folder=tmp_path / "c", on_bad_image="error")
    expected = f"1 of the images .*{images[2].name} \\(truncated\\).*on_bad_image=skip"
    with pytest.raises(UserError, match=expected):
        check_images(request)
    request.on_bad_image = "skip"  # the build leaves it out
    check_images(request)


def test_the_cache_plans_its_size_memory_and_disk_in_one_line(tmp_path, monkeypatch):
    from coco_multilabel.data import feature_cache

    sample = torch.zeros(1, 192, 12, 12)  # Lite0's map at 384 px below its last stage: float16 rows
    monkeypatch.setattr(feature_cache, "job_memory_available", lambda: 32 * 10**9)  # a Slurm job's 32 GB
    monkeypatch.setattr(feature_cache, "disk_free", lambda folder: 500 * 10**9)
    small = feature_cache.plan_cache(tmp_path / "key", 2_327, sample, flip=True)
    assert small.size == 2 * 2_327 * 192 * 12 * 12 * 2 and small.in_memory
    assert small.line() == (
        "feature cache: 2,327 images and their mirror images x 55.3 kB = 257.3 MB, read into memory "
        f"(under 30% of the 32.0 GB this job may still use); 500.0 GB free on {tmp_path}"
    )
    large = feature_cache.plan_cache(tmp_path / "key", 65_000, sample, flip=True, share=2)
    assert not large.in_memory and "memory-mapped from disk (2 copies over 30% of the 32.0 GB" in large.line()
    large.check()  # 7.2 GB: the disk holds it


def test_a_cache_whose_disk_cannot_hold_it_is_refused_before_anything_is_built(
    train_cfg, tmp_path, monkeypatch
):
    """ResNet-50's layer3 maps of 65,000 images do not fit a 40 GB quota: refused with what to change,
    before the trunk reads a single image and before any folder is made."""
    from coco_multilabel.data import feature_cache
    from coco_multilabel.errors import UserError

    monkeypatch.setattr(feature_cache, "disk_free", lambda folder: 40 * 10**9)
    plan = feature_cache.plan_cache(tmp_path / "k", 65_000, torch.zeros(1, 1024, 24, 24), flip=True)
    with pytest.raises(UserError) as refused:
        plan.check()
    message = str(refused.value)
    assert "155.7 TB" not in message and "= 153.4 GB" in message and "40.0 GB free" in message
    for alternative in ("model.top_stages", "backbone=efficientnet_lite0", "experiment=linear_probe",
                        "data.cache_flip=false", "data.cache_dir="):  # fmt: skip
        assert alternative in message
    monkeypatch.setattr(feature_cache, "disk_free", lambda folder: 1000)  # a full disk, in a real run
    cache_dir = tmp_path / "cache"
    with pytest.raises(UserError, match="the feature cache does not fit: feature cache: 48 images"):
        train(train_cfg("schedule=probe", f"data.cache_dir={cache_dir}"))
    assert not cache_dir.exists() or not [p for p in cache_dir.iterdir() if p.name != "labels"]


def test_a_cache_over_the_jobs_memory_limit_is_memory_mapped(images, tmp_path, monkeypatch):
    from coco_multilabel.data import feature_cache

    backbone = torchvision_backbone("mobilenet_v3_small", weights=None).eval()
    extract = lambda batch: backbone(batch.float() / 255)  # noqa: E731
    cache = build_or_load(tmp_path, images, extract, BACKBONE, eval_transform(image_size=32))
    folder = cache_folders(tmp_path)[0]
    monkeypatch.setattr(feature_cache, "job_memory_available", lambda: 10**12)
    assert not isinstance(FeatureCache.load(folder).features, np.memmap)
    monkeypatch.setattr(
        feature_cache, "job_memory_available", lambda: cache.features.nbytes * 3
    )  # a tight cgroup
    assert isinstance(FeatureCache.load(folder).features, np.memmap)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log")  # validation_step with no Trainer
def test_a_three_channel_cached_map_is_taken_for_features_not_for_an_image(tmp_path, monkeypatch):
    """The batch says what it holds: 3 x 2 x 2 maps, once taken for images by their shape, reach the
    top and head as they are, their mirror image's with them; the trunk never runs."""
    from coco_multilabel.data.feature_cache import CachedFeatures
    from coco_multilabel.models import MultiLabelClassifier

    folder, values = written_cache(tmp_path, n=4)
    stems, targets = ["s0", "s1", "s2", "s3"], np.eye(4, 80, dtype=bool)
    batch = CachedFeatures(FeatureCache.load(folder), stems, targets, pairs=True).__getitems__([0, 1, 2, 3])
    lite0 = "coco_multilabel.models.backbones.efficientnet_lite"
    backbone = {"_target_": lite0, "name": "efficientnet_lite0", "weights": None}
    model = MultiLabelClassifier(backbone, {"_target_": "torch.optim.Adam", "_partial_": True}, tta=True)
    seen = []

    def top(maps, top_stages, spatial):
        seen.append(maps)
        return maps.float().mean((1, 2, 3))[:, None].expand(-1, model.backbone.num_features)

    def trunk(*args):
        raise AssertionError("cached features went through the trunk, as images")

    monkeypatch.setattr(model.backbone, "top", top)
    monkeypatch.setattr(model.backbone, "trunk", trunk)
    with torch.no_grad():
        probs = model.eval().validation_step(batch, 0)["probs"]
    assert [tuple(m.shape) for m in seen] == [(4, 3, 2, 2)] * 2
    assert torch.equal(seen[0], values.half().float()) and torch.equal(seen[1], -seen[0])
    assert probs.shape == (4, 80)
