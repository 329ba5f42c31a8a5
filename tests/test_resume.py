"""Resume restores the run's config, and a relaunch compares a job's config with the one it ran
with. Fast: configs and records, no training."""

from __future__ import annotations

import json

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from coco_multilabel.cli import CONFIG_DIR, config_subdir
from coco_multilabel.errors import UserError
from coco_multilabel.sweeps.job import check_job_folder, config_change, job_identity
from coco_multilabel.training.resume import (
    changed_keys,
    fixed_changes,
    flatten,
    is_mutable,
    named_keys,
    restore,
)

SAVED = {
    "resume": None,
    "run_dir": "${hydra:runtime.output_dir}",
    "data": {"root": "/data", "image_size": 160, "num_workers": 0},
    "model": {"dropout": 0.2},
    "trainer": {"max_epochs": 4, "devices": 1},
    "callbacks": {"progress_bar": None, "kill": {"epoch": 1}},
}


def asked(**changes) -> dict:
    """Today's config for a resume: 384 px and 15 epochs by default, the resume's run keys, ``changes``."""
    today = json.loads(json.dumps(SAVED))
    today.update(resume="/runs/a")
    today["data"]["image_size"] = 384
    today["trainer"]["max_epochs"] = None
    today["callbacks"] = {"progress_bar": {"_target_": "Bar"}}
    for key, value in changes.items():
        OmegaConf.update(today_config := OmegaConf.create(today), key.replace("__", "."), value)
        today = OmegaConf.to_container(today_config)
    return today


def test_which_keys_a_resume_may_change():
    may = ["trainer.max_epochs", "trainer.max_time", "trainer.devices", "data.num_workers",
           "logger.csv.save_dir", "device_pool.ids", "keep_last_checkpoint",
           "callbacks.progress_bar"]  # fmt: skip
    may_not = ["data.image_size", "data.root", "backbone.name", "model.dropout", "optimizer.lr",
               "loss._target_", "schedule.top.epochs", "seed", "trainer.max_epochs_x",
               "callbacks.ema"]  # fmt: skip
    assert [k for k in may if not is_mutable(k)] == [] and [k for k in may_not if is_mutable(k)] == []


def test_a_resume_alone_continues_with_the_runs_own_config():
    config, taken = restore(SAVED, asked(), named={"data.root", "resume"}, run="/runs/a")
    assert config["data"]["image_size"] == 160 and config["trainer"]["max_epochs"] == 4  # not today's
    assert config["callbacks"] == SAVED["callbacks"]  # its callbacks as they were, the added one too
    assert config["resume"] == "/runs/a" and taken == []


def test_a_resume_may_extend_the_epoch_cap_and_change_workers_but_not_what_was_trained():
    more = asked(trainer__max_epochs=6, data__num_workers=4)
    config, taken = restore(SAVED, more, named={"trainer.max_epochs", "data.num_workers"}, run="/runs/a")
    assert (config["trainer"]["max_epochs"], config["data"]["num_workers"]) == (6, 4)
    assert taken == ["data.num_workers", "trainer.max_epochs"]
    with pytest.raises(UserError) as refused:
        restore(SAVED, asked(data__image_size=384), named={"data.image_size"}, run="/runs/a")
    message = str(refused.value)
    assert "/runs/a was made with data.image_size=160" in message
    assert "asks for data.image_size=384" in message
    assert "start a new run instead" in message and "\n" not in message
    # repeating the run's own value is no change
    config, _ = restore(SAVED, asked(data__image_size=160), named={"data.image_size"}, run="/runs/a")
    assert config["data"]["image_size"] == 160


def test_a_logging_subtree_swapped_by_a_resume_replaces_the_runs():
    saved = {**SAVED, "logger": {"tensorboard": {"_target_": "TB", "version": ""}}}
    today = {**asked(), "logger": {"csv": {"_target_": "CSV"}}}
    config, _ = restore(saved, today, named={"logger"}, run="/runs/a")
    assert config["logger"] == {"csv": {"_target_": "CSV"}}
    unnamed, _ = restore(saved, today, named=set(), run="/runs/a")
    assert unnamed["logger"] == saved["logger"]


@pytest.fixture(scope="module")
def hydra_compose():
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        yield lambda overrides: OmegaConf.to_container(compose("train", overrides=overrides))


GROUPS = {"backbone", "callbacks", "data", "experiment", "logger", "loss", "optimizer", "schedule",
          "scheduler", "sweep", "trainer"}  # fmt: skip
MADE = {"backbone": "efficientnet_lite0", "experiment": "top_csra", "trainer": "default", "logger": "csv"}


def test_a_group_option_names_the_keys_it_changes_from_the_runs_option(hydra_compose):
    made = hydra_compose(["data.root=/d", "trainer.max_epochs=4"])  # the run
    resume = ["data.root=/d", "trainer=gpu"]
    named = named_keys(resume, GROUPS, {**MADE, "trainer": "gpu"}, MADE, hydra_compose)
    assert "trainer.accelerator" in named  # the devices (precision follows them): a resume may change them
    assert not any(k in named for k in ("trainer.max_epochs", "backbone.name"))  # gpu.yaml has null too
    config, taken = restore(made, hydra_compose(resume), named, run="/runs/a")
    assert config["trainer"]["accelerator"] == "gpu" and config["trainer"]["max_epochs"] == 4
    # another backbone or recipe names what they change, which a resume refuses
    named = named_keys(["backbone=resnet18"], GROUPS, {**MADE, "backbone": "resnet18"}, MADE, hydra_compose)
    assert "backbone.name" in named
    with pytest.raises(UserError, match=r"backbone.name=efficientnet_lite0, .*which a resume cannot change"):
        restore(made, hydra_compose(["data.root=/d", "backbone=resnet18"]), named, run="/runs/a")
    off = named_keys(["~experiment"], GROUPS, {k: v for k, v in MADE.items() if k != "experiment"}, MADE,
                     hydra_compose)  # fmt: skip
    assert {"data.image_size", "model.head"} <= off
    # the run's own options repeated, and Hydra's own settings, name nothing
    repeated = ["backbone=efficientnet_lite0", "experiment=top_csra", "hydra.run.dir=x", "hydra/launcher=a"]
    assert named_keys(repeated, GROUPS, MADE, MADE, lambda o: pytest.fail("no compose needed")) == set()
    assert named_keys(["backbone=resnet18"], GROUPS, MADE, {}, None) == {"backbone"}  # options unknown
    assert named_keys(["+callbacks.kill.epoch=1", "data.image_size=160"], GROUPS, MADE, MADE, None) == {
        "callbacks.kill.epoch", "data.image_size"}  # fmt: skip


def test_changed_keys_ignore_which_run_and_list_removed_subtrees():
    assert changed_keys(SAVED, {**SAVED, "resume": "/x", "run_dir": "/y"}) == []
    today = {**SAVED, "callbacks": {"progress_bar": None}, "model": {"dropout": 0.5}}
    assert changed_keys(SAVED, today) == ["callbacks.kill.epoch", "model.dropout"]
    elsewhere = {**today, "trainer": {"max_epochs": 9, "devices": 2}}  # and longer
    assert fixed_changes(SAVED, elsewhere) == changed_keys(SAVED, today)
    assert flatten({"a": {"b": [1, 2], "c": {}}}) == {"a.b": [1, 2], "a.c": {}}


def test_a_job_is_finished_only_for_the_config_it_ran_with(tmp_path):
    job = tmp_path / "0"
    job.mkdir()
    record = {"status": "done", "overrides": ["model.dropout=0.1"], "config": SAVED}
    (job / "result.json").write_text(json.dumps(record))
    assert config_change(job, record, SAVED) is None
    assert config_change(job, record, {**SAVED, "trainer": {"max_epochs": 30, "devices": 4}}) is None
    edited = {**SAVED, "model": {"dropout": 0.5}}
    change = config_change(job, record, edited)
    assert change == "model.dropout=0.2, which the config now sets to model.dropout=0.5"
    with pytest.raises(UserError, match=r"ran with model.dropout=0.2.*finished only for the config it ran"):
        check_job_folder(job, ["model.dropout=0.1"], edited)
    # a job that failed before it trained holds no result: it just runs again with today's config
    failed = {**record, "status": "failed"}
    assert config_change(job, failed, edited) is None
    (job / "checkpoints").mkdir()
    (job / "checkpoints" / "last.ckpt").write_bytes(b"")
    assert config_change(job, failed, edited) is not None  # ... unless it has a checkpoint to resume
    # a job's identity in its grid: where and how it runs aside
    launch = ["model.dropout=0.1", "trainer.max_epochs=30", "hydra.sweep.dir=x", "logger=csv"]
    assert job_identity(launch) == ["model.dropout=0.1"]
    with pytest.raises(UserError, match="holds another sweep"):
        check_job_folder(job, ["model.dropout=0.3"])


def test_a_later_launch_in_a_run_folder_keeps_its_hydra_config(tmp_path):
    assert config_subdir(str(tmp_path)) == ".hydra"
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text("seed: 0\n")
    assert config_subdir(str(tmp_path)).startswith(".hydra/resumed/")
