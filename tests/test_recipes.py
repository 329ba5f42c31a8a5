"""Every backbone, every recipe: the default recipe (top stage + CSRA on cached maps) trains on one
small network of every backbone config, each experiment runs, a transformer is refused with what
works, and a backbone x learning-rate multirun runs the default recipe in every job."""

import json
from pathlib import Path

import pytest

from coco_multilabel.cli import CONFIG_DIR
from coco_multilabel.data.feature_cache import cache_folders
from coco_multilabel.errors import UserError
from coco_multilabel.train import train
from tests.helpers import cli

BACKBONES = sorted(p.stem for p in (Path(CONFIG_DIR) / "backbone").glob("*.yaml"))
DEFAULT = ["experiment=top_csra", "offline=true", "data.image_size=64", "trainer.max_epochs=1"]


@pytest.mark.slow
@pytest.mark.parametrize("backbone", BACKBONES)
def test_the_default_recipe_trains_every_backbone(backbone, train_cfg, tmp_path):
    extra = ["backbone.name=resnet10t"] if backbone == "timm" else []  # backbone=timm's default is resnet18
    summary = train(
        train_cfg(*DEFAULT, f"backbone={backbone}", *extra, f"data.cache_dir={tmp_path / 'cache'}")
    )
    assert summary["epochs"] == 1 and summary["phases"][0]["train"] == "top"
    assert Path(summary["best_checkpoint"]).is_file() and len(cache_folders(tmp_path / "cache")) == 1


# each experiment's phases, one epoch each here, and whether its backbone learns in each
PHASES = {
    "lp_ft": [("probe", False), ("finetune", True)],
    "plain": [("finetune", True)],
    "linear_probe": [("probe", False)],
    "finetune": [("finetune", True)],
}


@pytest.mark.slow
@pytest.mark.parametrize("experiment", list(PHASES))
def test_every_experiment_trains_what_it_says(experiment, train_cfg, tmp_path):
    """Every epoch trains its head; the backbone changes only in the phases that train it."""
    record = tmp_path / "fit.json"
    one_epoch_each = [f"schedule.{phase}.epochs=1" for phase, _ in PHASES[experiment]]
    summary = train(
        train_cfg(
            f"experiment={experiment}",
            "data.image_size=32",
            "data.batch_size=16",
            *one_epoch_each,
            "trainer.max_epochs=null",
            f"data.cache_dir={tmp_path / 'cache'}",
            "+callbacks.fit._target_=tests.helpers.FitRecorder",
            f"+callbacks.fit.out={record}",
        )  # fmt: skip
    )
    epochs = [epoch for fit in json.loads(record.read_text()) for epoch in fit["epochs"]]
    assert summary["epochs"] == len(epochs) == len(PHASES[experiment])
    for epoch, (phase, trains_backbone) in zip(epochs, PHASES[experiment], strict=True):
        assert epoch["phase"] == phase
        assert epoch["start"]["head"] != epoch["end"]["head"]
        assert (epoch["start"]["backbone"] != epoch["end"]["backbone"]) == trains_backbone, phase


@pytest.mark.slow
def test_a_transformer_is_refused_by_the_default_recipe_and_trains_with_lp_ft(train_cfg, tmp_path):
    vit = ["backbone=timm", "backbone.name=vit_tiny_patch16_224", "offline=true", "data.image_size=224"]
    with pytest.raises(
        UserError, match="model.top_stages=1 needs a backbone that runs as a chain.*experiment=lp_ft"
    ):
        train(train_cfg("experiment=top_csra", *vit))
    summary = train(
        train_cfg("experiment=lp_ft", *vit, "data.batch_size=16", f"data.cache_dir={tmp_path / 'c'}")
    )
    assert summary["epochs"] == 1


@pytest.mark.slow
def test_a_backbone_by_lr_multirun_runs_the_default_recipe_in_every_job(tiny_root, tmp_path):
    sweep = tmp_path / "sweep"
    result = cli(
        f"data.root={tiny_root}",
        *DEFAULT,
        f"hydra.sweep.dir={sweep}",
        f"data.cache_dir={tmp_path / 'c'}",
        "backbone=mobilenet_v3_small,resnet18",
        "optimizer.lr=1e-3,3e-3",
        "-m",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stdout + result.stderr
    rows = (sweep / "summary.csv").read_text().splitlines()[1:]
    assert len(rows) == 4 and all(",done," in row for row in rows)
    assert len(cache_folders(tmp_path / "c")) == 2  # one cache per backbone, shared by its two lrs


GPU_RECIPE = "experiment=finetune_384_asl_ema"


def test_the_gpu_recipe_is_the_literatures_whole_network_fine_tuning(monkeypatch, tmp_path):
    """ConvNeXt-T from ImageNet-22k at 384 px, timm's ASL, EMA, RandAugment and cutout, AdamW with
    warm-up and cosine, bf16 on an Ampere GPU, channels_last and compile; Lite2 offline."""
    import torch
    from hydra import compose, initialize_config_dir

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=0: (8, 0))
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[GPU_RECIPE, "data.root=x", f"run_dir={tmp_path}"])
        lite2 = compose("train", overrides=[GPU_RECIPE, "backbone=efficientnet_lite2", "data.root=x"])
    assert "in22k" in cfg.backbone.name and cfg.backbone.pretrained and cfg.data.image_size == 384
    assert cfg.loss._target_ == "timm.loss.AsymmetricLossMultiLabel" and cfg.loss.gamma_neg == 4
    assert cfg.callbacks.ema.decay == 0.9997 and cfg.data.randaugment_ops == 2 and cfg.data.cutout_prob == 0.5
    assert cfg.optimizer._target_ == "torch.optim.AdamW" and cfg.scheduler.warmup_fraction > 0
    assert dict(cfg.schedule) == {"finetune": {"epochs": 40, "train": "all", "inputs": "images"}}
    assert (cfg.trainer.precision, cfg.model.eval_precision) == ("bf16-mixed", "bf16")
    assert cfg.model.channels_last and cfg.model.compile
    assert lite2.backbone.weights == "embedded"  # the offline choice downloads nothing


@pytest.mark.slow
def test_the_gpu_recipe_trains_on_cpu_at_tiny_size(train_cfg, tmp_path, monkeypatch):
    """The recipe as it is (ConvNeXt-T offline, random weights), at 64 px for one epoch. Its
    torch.compile goes through Dynamo for real; the code generation (Inductor, minutes on CPU) is
    swapped for ``aot_eager`` here: test_compile_with_inductor_trains_a_tiny_model runs it."""
    import torch
    from torch._dynamo.utils import counters

    compile_module = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self: compile_module(self, backend="aot_eager"))
    counters.clear()
    tiny = [
        "backbone=timm",
        "offline=true",
        "data.image_size=64",
        "data.batch_size=12",
        "trainer.max_epochs=1",
    ]
    summary = train(train_cfg(GPU_RECIPE, *tiny))
    assert summary["epochs"] == 1 and Path(summary["best_checkpoint"]).is_file()
    assert counters["stats"]["unique_graphs"] >= 1  # forward ran compiled
    checkpoint = torch.load(summary["best_checkpoint"], weights_only=False)
    assert checkpoint["hyper_parameters"]["compile"] is True
    assert checkpoint["hyper_parameters"]["loss"]["_target_"] == "timm.loss.AsymmetricLossMultiLabel"
    assert not any("_orig_mod" in key for key in checkpoint["state_dict"])  # names as without compile
    assert "current_model_state" in checkpoint  # the EMA callback saved the raw weights beside


@pytest.mark.slow
def test_compile_with_inductor_trains_a_tiny_model(train_cfg):
    """model.compile=true with torch.compile's own code generation (Inductor: C++ on CPU) on timm's
    smallest EfficientNet: trains, validates and saves a checkpoint submit can load."""
    from coco_multilabel.models.checkpoints import load_model

    summary = train(train_cfg("backbone=timm", "backbone.name=test_efficientnet", "offline=true",
                              "model.compile=true", "callbacks.ema=null", "trainer.limit_train_batches=2",
                              "+trainer.num_sanity_val_steps=0"))  # fmt: skip
    assert summary["epochs"] == 1 and 0 <= summary["best_score"] <= 1
    load_model(summary["best_checkpoint"])
