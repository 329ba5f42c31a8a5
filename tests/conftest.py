"""Shared fixtures: a tiny generated dataset and the real configs composed with tiny overrides."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

from coco_multilabel.cli import CONFIG_DIR
from coco_multilabel.data.synthetic import make_dataset

TINY = [
    "~experiment",  # not the default recipe's 384 px linear probe + fine-tune: tests set what they test
    "backbone=mobilenet_v3_small",
    "backbone.weights=null",  # random weights: tests never download
    "data.image_size=32",
    "data.batch_size=16",
    "data.num_workers=0",
    "data.val_fraction=0.25",
    "trainer.max_epochs=1",
    "trainer.accelerator=cpu",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "callbacks.progress_bar=null",
    "logger=csv",
    "keep_last_checkpoint=true",  # tests resume and read finished runs' last.ckpt
]


def tiny(*overrides: str) -> list[str]:
    """TINY, then ``overrides``; an ``experiment=`` or ``backbone=`` among them replaces TINY's."""
    dropped = {key for key in ("experiment", "backbone") if any(o.startswith(f"{key}=") for o in overrides)}
    kept = [o for o in TINY if not any(o.lstrip("~").startswith(key) for key in dropped)]
    return [*kept, *overrides]


def compose_tiny(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=tiny(*overrides))


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    """48 labelled and 8 test images of 48 px in the challenge layout."""
    return make_dataset(tmp_path_factory.mktemp("data"), n_train=48, n_test=8, size=48)


@pytest.fixture
def train_cfg(tiny_root, tmp_path):
    """The real train config with tiny overrides; extra overrides as arguments."""

    def make(*overrides: str, run_dir=None):
        return compose_tiny(f"data.root={tiny_root}", f"run_dir={run_dir or tmp_path / 'run'}", *overrides)

    return make


@pytest.fixture(scope="session")
def tensorboard_run(tiny_root, tmp_path_factory):
    """A tiny two-epoch run logged to TensorBoard, its val batches cached features, with the
    ``.hydra/config.yaml`` Hydra would leave; shared by the figures and report tests."""
    from omegaconf import OmegaConf

    from coco_multilabel.train import train

    run_dir = tmp_path_factory.mktemp("tensorboard_run")
    overrides = [
        *TINY, f"data.root={tiny_root}", f"run_dir={run_dir}", "logger=tensorboard", "trainer.max_epochs=2",
        "schedule=probe", f"data.cache_dir={run_dir / 'cache'}",
        "callbacks.figures.examples=4",
    ]  # fmt: skip
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    summary = train(cfg)
    (run_dir / ".hydra").mkdir()
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    OmegaConf.save(OmegaConf.create(overrides), run_dir / ".hydra" / "overrides.yaml")
    return run_dir, summary
