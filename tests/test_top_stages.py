"""The backbone cut into a frozen trunk and a top that trains, the CSRA head, and both on the cache."""

import numpy as np
import pytest
import torch

from coco_multilabel.data.feature_cache import FeatureCache, cache_folders
from coco_multilabel.errors import UserError
from coco_multilabel.models import MultiLabelClassifier
from coco_multilabel.models.checkpoints import read_checkpoint
from coco_multilabel.models.heads import ClassSpecificResidualAttention
from coco_multilabel.submit import submit
from coco_multilabel.train import train
from coco_multilabel.training.schedule import Phase, top_stages_of

LITE0 = {"_target_": "coco_multilabel.models.backbones.efficientnet_lite", "name": "efficientnet_lite0",
         "weights": None}  # fmt: skip
OPTIMIZER = {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-2}


TOP = Phase("top", epochs=1, train="top", inputs="cache", lr_scale=0.5)


def lite0_model(**kwargs) -> MultiLabelClassifier:
    return MultiLabelClassifier(backbone=LITE0, optimizer=OPTIMIZER, **kwargs)


def test_cuts_the_model_cannot_make_are_refused_with_the_option_to_change():
    with pytest.raises(UserError, match="model.head must be one of"):
        lite0_model(head="transformer")
    with pytest.raises(UserError, match="has 6 stages, so at most 5"):
        lite0_model(top_stages=6)


def test_the_cut_is_taken_from_the_schedule_unless_given_and_then_must_agree_with_it():
    probe = Phase("probe", epochs=1, train="head", inputs="cache")
    assert top_stages_of(None, [probe, TOP]) == 1 and top_stages_of(None, [probe]) == 0
    assert top_stages_of(2, [TOP]) == 2 and top_stages_of(0, [probe]) == 0
    assert top_stages_of(None, [probe, Phase("top", epochs=0, train="top")]) == 0  # a phase that won't run
    with pytest.raises(UserError, match="schedule.top trains the top, but model.top_stages=0"):
        top_stages_of(0, [TOP])
    with pytest.raises(UserError, match="model.top_stages=1 only matters to a phase with train: top"):
        top_stages_of(1, [probe])


def test_csra_adds_lambda_times_each_class_highest_score_to_its_mean_score():
    torch.manual_seed(0)
    head = ClassSpecificResidualAttention(8, 3, dropout=0.0, lam=0.5).eval()
    maps = torch.randn(2, 8, 4, 4)
    scores = torch.einsum("nchw,kc->nkhw", maps, head.classifier.weight).flatten(2)
    expected = scores.mean(2) + 0.5 * scores.amax(2) + head.classifier.bias
    assert torch.allclose(head(maps), expected, atol=1e-5)
    head.lam = 0.0  # without the attention term it is the linear head on average-pooled features
    assert torch.allclose(head(maps), head.classifier(maps.mean((2, 3))), atol=1e-5)
    # one small object: a single hot position counts more than it does in the average
    small = torch.zeros(1, 8, 4, 4)
    small[0, :, 1, 2] = head.classifier.weight[0]
    head.lam = 0.5
    bias = head.classifier.bias[0]
    with_max, average_only = head(small)[0, 0] - bias, head.classifier(small.mean((2, 3)))[0, 0] - bias
    assert with_max > 1.4 * average_only > 0


def test_top_stages_train_while_the_trunk_stays_frozen():
    torch.manual_seed(0)
    model = lite0_model(top_stages=1, head="csra")
    model.set_phase(TOP)
    model.train()
    blocks = model.backbone.model.blocks
    top = [p for m in model._top_modules() for p in m.parameters()]
    trunk = [p for p in model.backbone.parameters() if all(p is not q for q in top)]
    assert all(p.requires_grad for p in top) and not any(p.requires_grad for p in trunk)
    assert not blocks[0].training and blocks[-1].training  # the trunk's batch norms stay frozen
    assert model.backbone.model.bn2.training
    model.trunk_features(torch.randn(1, 3, 64, 64))  # building the cache leaves every mode as it was
    assert not blocks[0].training and blocks[-1].training
    before = [p.detach().clone() for p in (trunk[0], top[0], model.head.classifier.weight)]
    optimizer = model.configure_optimizers()
    # head, then the top at lr_scale; each split into weights and (decay-free) norms and biases
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1e-2, 1e-2, 5e-3, 5e-3])
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.01, 0.0, 0.01, 0.0]  # AdamW's default
    top_norms = [m for t in model._top_modules() for m in t.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    decay_free = {id(p) for g in optimizer.param_groups if not g["weight_decay"] for p in g["params"]}
    assert top_norms and all(id(p) in decay_free for m in top_norms for p in m.parameters())
    images, targets = torch.randn(4, 3, 64, 64), torch.randint(0, 2, (4, 80)).float()
    model.criterion(model(images=images), targets).backward()
    optimizer.step()
    after = (trunk[0], top[0], model.head.classifier.weight)
    assert torch.equal(before[0], after[0])
    assert not torch.equal(before[1], after[1]) and not torch.equal(before[2], after[2])


def test_logits_from_cached_trunk_maps_equal_those_from_images():
    torch.manual_seed(0)
    model = lite0_model(top_stages=1, head="csra", tta=True)
    model.set_phase(TOP)
    model.eval()
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        maps = model.trunk_features(images)
        cached = {"features": maps, "mirror_features": model.trunk_features(images.flip(-1))}  # as val's
        assert maps.shape == (3, 192, 2, 2)
        assert torch.allclose(model(features=maps), model(images=images), atol=1e-5)
        assert torch.allclose(model.probabilities(cached), model.probabilities({"images": images}), atol=1e-5)
    assert (model.trunk_cut()["top_stages"], model.trunk_cut()["spatial"]) == (1, True)
    pooled = lite0_model().trunk_cut()  # random weights: ImageNet statistics, in the cache's key too
    assert (pooled["top_stages"], pooled["spatial"], pooled["mean"][0]) == (0, False, 0.485)
    model.mean.fill_(0.5)
    assert model.trunk_cut()["mean"] == [0.5] * 3


@pytest.mark.slow
def test_train_on_cached_trunk_maps_then_submit_from_images(train_cfg, tiny_root, tmp_path):
    cfg = train_cfg(
        "backbone=efficientnet_lite0", "backbone.weights=null", "data.image_size=64",
        "schedule=top", "model.top_stages=1", "model.head=csra",
        f"data.cache_dir={tmp_path / 'cache'}", "trainer.max_epochs=2", run_dir=tmp_path / "run",
    )  # fmt: skip
    summary = train(cfg)
    (folder,) = cache_folders(tmp_path / "cache")
    cache = FeatureCache.load(folder)
    assert cache.features.dtype == np.float16 and cache.features.shape[1:] == (192, 2, 2)
    checkpoint = read_checkpoint(summary["best_checkpoint"])
    assert checkpoint["hyper_parameters"]["top_stages"] == 1
    out = submit(summary["best_checkpoint"], str(tiny_root), str(tmp_path / "sub.json"),
                 progress_bar=False, num_workers=0)  # fmt: skip
    assert len(out.read_text()) > 2
