"""Every backbone, every recipe: the default recipe (top stage + CSRA on cached maps) trains on one
small network of every backbone config, each experiment runs, a transformer is refused with what
works, and a backbone x learning-rate multirun runs the default recipe in every job."""

from pathlib import Path

import pytest

from coco_multilabel.cli import CONFIG_DIR
from coco_multilabel.data.feature_cache import cache_folders
from coco_multilabel.errors import UserError
from coco_multilabel.train import train
from tests.helpers import cli

BACKBONES = sorted(p.stem for p in (Path(CONFIG_DIR) / "backbone").glob("*.yaml"))
DEFAULT = ["experiment=top_csra", "offline=true", "data.image_size=64", "trainer.max_epochs=1"]


@pytest.mark.parametrize("backbone", BACKBONES)
def test_the_default_recipe_trains_every_backbone(backbone, train_cfg, tmp_path):
    extra = ["backbone.name=resnet10t"] if backbone == "timm" else []  # backbone=timm's default is resnet18
    summary = train(
        train_cfg(*DEFAULT, f"backbone={backbone}", *extra, f"data.cache_dir={tmp_path / 'cache'}")
    )
    assert summary["epochs"] == 1 and summary["phases"][0]["train"] == "top"
    assert Path(summary["best_checkpoint"]).is_file() and len(cache_folders(tmp_path / "cache")) == 1


@pytest.mark.parametrize("experiment", ["lp_ft", "plain", "linear_probe", "finetune"])
def test_every_experiment_trains(experiment, train_cfg, tmp_path):
    summary = train(
        train_cfg(
            f"experiment={experiment}",
            "data.image_size=32",
            "data.batch_size=16",
            "trainer.max_epochs=2",
            f"data.cache_dir={tmp_path / 'cache'}",
        )
    )
    assert summary["epochs"] == 2


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
