"""Config plumbing, and every preset in conf/: each composes and builds what it names, so that a
broken composition (a group option whose keys leak into another's, a renamed target) fails here
rather than in a user's hands."""

from __future__ import annotations

import os
import site
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

from coco_multilabel.cli import CONFIG_DIR, run_dir_for
from coco_multilabel.models import MultiLabelClassifier
from coco_multilabel.training.options import check_options
from coco_multilabel.training.schedule import phases_from_config, top_stages_of

CONF = Path(CONFIG_DIR)
GROUPS = (
    "experiment",
    "backbone",
    "loss",
    "optimizer",
    "scheduler",
    "trainer",
    "logger",
    "callbacks",
    "data",
)


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def sweep_jobs() -> list[list[str]]:
    """Each job of each named grid in conf/sweep/, as the overrides Hydra's sweeper gives it."""
    jobs = []
    for name in options("sweep"):
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            params = compose(
                "train", overrides=[f"sweep={name}"], return_hydra_config=True
            ).hydra.sweeper.params
        grid = [[]]
        for key, values in params.items():
            grid = [[*job, f"{key}={value}"] for job in grid for value in str(values).split(",")]
        jobs += [[f"sweep={name}", *job] for job in grid]
    return jobs


def offline(cfg) -> None:
    """Tests never download: hub weights become random ones (the embedded weights stay)."""
    with open_dict(cfg):
        if cfg.backbone.get("weights") not in (None, "embedded"):
            cfg.backbone.weights = None
        if cfg.backbone.get("pretrained"):
            cfg.backbone.pretrained = False
        if not torch.cuda.is_available() and cfg.trainer.accelerator == "gpu":  # the GPU presets, on CPU
            cfg.trainer.accelerator = "cpu"
            cfg.trainer.devices = 2 if cfg.trainer.get("strategy") == "ddp" else 1
            cfg.trainer.precision = "bf16-mixed"


def build(cfg) -> None:
    """Check the schedule and its options as train does, and instantiate everything the config
    names: model (backbone, head, loss), optimizer, lr schedule, datamodule, callbacks, loggers and
    trainer."""
    offline(cfg)
    phases = phases_from_config(cfg.schedule, cfg.trainer.max_epochs)
    check_options(cfg, phases)
    model = MultiLabelClassifier(
        backbone=cfg.backbone, optimizer=cfg.optimizer, scheduler=cfg.get("scheduler"), loss=cfg.get("loss"),
        **{**cfg.model, "top_stages": top_stages_of(cfg.model.top_stages, phases)},
    )  # fmt: skip
    optimizer = instantiate(cfg.optimizer)(model.parameters())
    if cfg.get("scheduler"):
        instantiate(cfg.scheduler)(optimizer, total_steps=100)
    instantiate(cfg.data, split_file=None, _convert_="all")
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c]
    instantiate(cfg.trainer, max_epochs=1, max_time=None, callbacks=callbacks, logger=loggers or False)


def compose_train(overrides, tmp_path, tiny_root, config="train"):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config, overrides=[*overrides, f"run_dir={tmp_path}", f"data.root={tiny_root}"])


@pytest.mark.parametrize(
    "override",
    # each with the default recipe; a schedule without a top phase without the cut at the top
    [f"{g}={o}" for g in GROUPS for o in options(g) if g != "schedule"]
    + [f"schedule={o}" + ("" if o == "top" else " model.top_stages=0") for o in options("schedule")],
)
def test_every_group_option_composes_and_builds(override, tmp_path, tiny_root):
    build(compose_train(override.split(), tmp_path, tiny_root))


@pytest.mark.parametrize("job", sweep_jobs(), ids=" ".join)
def test_every_sweep_job_composes_and_builds(job, tmp_path, tiny_root):
    build(compose_train(job, tmp_path, tiny_root))


def test_the_demo_composes_and_builds_its_own_recipe(tmp_path, tiny_root):
    cfg = compose_train([], tmp_path, tiny_root, config="demo")
    assert cfg.loss == {"_target_": "torch.nn.BCEWithLogitsLoss"}  # nothing of pos_weight leaks in
    assert list(cfg.schedule) == ["finetune"] and cfg.schedule.finetune.inputs == "images"
    build(cfg)


@pytest.mark.parametrize("config", ["submit", "evaluate"])
def test_the_other_entry_points_compose(config):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config, overrides=["ckpt_path=x"] if config == "submit" else ["labels=y"])
    assert OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves


@pytest.mark.slow
def test_the_configs_are_the_repositorys_conf_in_a_clone_and_an_editable_install(tmp_path):
    """Here (an editable install, or PYTHONPATH) the configs are the repository's conf/; and a clone
    that is not installed finds them too: its dependencies importable but no finder of the project
    (-S: site-packages' .pth files, the editable install's among them, are not run)."""
    root = Path(__file__).resolve().parent.parent
    assert CONF == root / "conf"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), *site.getsitepackages()])}
    clone = [sys.executable, "-S", "-m", "coco_multilabel.train", "--info", "searchpath"]
    searchpath = subprocess.run(clone, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert f"file://{root / 'conf'} " in searchpath.stdout, searchpath.stdout + searchpath.stderr


def test_a_resumed_run_continues_in_its_own_folder():
    assert run_dir_for(None, "outputs/train/new") == "outputs/train/new"
    assert run_dir_for("outputs/train/a/checkpoints/last.ckpt", "outputs/train/new") == "outputs/train/a"
    assert run_dir_for("elsewhere/model.ckpt", "outputs/train/new") == "elsewhere"


def test_resume_points_at_the_runs_last_checkpoint(train_cfg):
    cfg = train_cfg("resume=outputs/train/a")
    assert cfg.ckpt_path == "outputs/train/a/checkpoints/last.ckpt"
    assert train_cfg().ckpt_path is None
