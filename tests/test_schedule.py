"""Training as phases: the schedule checked before anything trains, one fit per phase (DDP ranks in
step in every phase), budgets over the whole run, resume in the phase where a run stopped, and
options that would silently do nothing refused."""

import json
import signal
import time

import pytest
import torch
from hydra import compose, initialize_config_dir

from coco_multilabel.callbacks.budget import RunBudget, parse_duration
from coco_multilabel.cli import CONFIG_DIR
from coco_multilabel.errors import UserError
from coco_multilabel.train import train
from coco_multilabel.training.schedule import Phase, phase_ends, phases_from_config, resume_phase
from tests.helpers import cli

TWO = {
    "probe": {"epochs": 3, "train": "head", "inputs": "cache"},
    "finetune": {"epochs": 2, "train": "all", "inputs": "images", "lr_scale": 0.05},
}


def test_phases_are_read_checked_and_capped_earlier_first():
    phases = phases_from_config(TWO)
    assert [(p.name, p.epochs, p.train, p.inputs, p.lr_scale) for p in phases] == [
        ("probe", 3, "head", "cache", 1.0),
        ("finetune", 2, "all", "images", 0.05),
    ]
    assert phase_ends(phases) == [3, 5]
    assert [p.epochs for p in phases_from_config(TWO, max_epochs=4)] == [3, 1]
    assert [p.epochs for p in phases_from_config(TWO, max_epochs=2)] == [2, 0]
    for bad, message in (
        ({"p": {"epochs": 1, "lr": 1}}, "schedule.p: unknown key 'lr'"),
        ({"p": {"epochs": -1}}, "schedule.p.epochs must be a whole number"),
        ({"p": {"epochs": 1, "train": "backbone"}}, "schedule.p.train must be one of head, top, all"),
        ({"p": {"epochs": 1, "inputs": "disk"}}, "schedule.p.inputs must be one of cache, images"),
        ({"p": {"epochs": 1, "lr_scale": 0}}, "schedule.p.lr_scale must be above 0"),
        ({"p": {"epochs": 1, "train": "all", "inputs": "cache"}}, "trains everything on cached features"),
        ({}, "schedule is empty"),
    ):
        with pytest.raises(UserError, match=message):
            phases_from_config(bad)


def test_resume_finds_the_phase_of_the_checkpoint_or_refuses_another_schedule():
    phases = phases_from_config(TWO)
    assert resume_phase(None, phases, "x") == 0
    saved = {"index": 1, **Phase("finetune", 2, "all", "images", 0.05).record()}
    assert resume_phase(saved, phases, "x") == 1
    with pytest.raises(UserError, match="saved in phase 'finetune'.*resume with the schedule"):
        resume_phase(saved, phases[:1], "x.ckpt")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["schedule=top", "model.top_stages=1", "data.randaugment_ops=2"],
            "data.randaugment_ops=2 augments images",
        ),
        (["schedule=probe", "data.cutout_prob=0.5"], "data.cutout_prob=0.5 augments images"),
        (["schedule=probe", "data.crop_scale=[0.3,1.0]"], "data.crop_scale=.* augments images"),
        (["data.randaugment_ops=2", "data.augment=false"], "does nothing with data.augment=false"),
        (["schedule=probe", "model.tta=true", "data.cache_flip=false"], "model.tta=true averages"),
        (["schedule=probe", "model.tta=false", "data.cache_flip=false"], "data.hflip_prob=0.5 flips"),
        (
            ["schedule=probe_finetune", "scheduler=onecycle", "trainer.max_epochs=null"],
            "lr_scale=0.05 would be lost",
        ),
        (["schedule=top", "model.top_stages=0"], "schedule.top trains the top, but model.top_stages=0"),
        (["model.top_stages=1"], "model.top_stages=1 only matters to a phase with train: top"),
        (["thresholds.shrinkage=3"], "thresholds.shrinkage applies to per-class thresholds only"),
        (["data.cache_on_device=true"], "data.cache_on_device=true keeps the feature cache on the device"),
    ],
)
def test_options_that_would_do_nothing_are_refused_before_training(train_cfg, tmp_path, overrides, message):
    with pytest.raises(UserError, match=message):
        train(train_cfg(*overrides, run_dir=tmp_path / "run"))
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_debug_is_one_short_epoch_whatever_the_recipe():
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        for experiment in ("top_csra", "lp_ft", "finetune"):
            cfg = compose("train", overrides=[f"experiment={experiment}", "trainer=debug"])
            phases = phases_from_config(cfg.schedule, cfg.trainer.max_epochs)
            assert sum(p.epochs for p in phases) == 1 and cfg.trainer.limit_train_batches == 4


@pytest.mark.slow
def test_two_phases_are_two_fits_on_one_run(train_cfg, tmp_path):
    summary = train(
        train_cfg(
            "schedule=probe_finetune",
            "schedule.probe.epochs=2",
            "schedule.finetune.epochs=1",
            "trainer.max_epochs=null",
            f"data.cache_dir={tmp_path / 'cache'}",
            run_dir=tmp_path / "run",
        )
    )
    assert summary["epochs"] == 3 and [p["name"] for p in summary["phases"]] == ["probe", "finetune"]
    header, *rows = (tmp_path / "run" / "csv" / "metrics.csv").read_text().splitlines()
    column = header.split(",").index("phase")
    assert sorted({float(r.split(",")[column]) for r in rows if r.split(",")[column]}) == [0.0, 1.0]
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["phase"]["name"] == "finetune" and last["epoch"] == 2
    monitor = header.split(",").index("val/macro_f1_xfit")  # best.ckpt: the best epoch over both phases
    scores = [float(r.split(",")[monitor]) for r in rows if r.split(",")[monitor]]
    assert len(scores) == 3 and summary["best_score"] == pytest.approx(max(scores))


def test_the_budget_covers_the_whole_run_and_a_cut_epoch_says_so(train_cfg, tmp_path):
    assert parse_duration("00:00:15:00") == 900 and parse_duration({"minutes": 2}) == 120
    summary = train(
        train_cfg(
            "schedule=probe_finetune",
            "trainer.max_epochs=null",
            "trainer.max_time=00:00:00:00",
            f"data.cache_dir={tmp_path / 'cache'}",
            run_dir=tmp_path / "run",
        )
    )
    # no time at all: the run stops after one batch of the first epoch, and says so
    assert summary["cut_epoch"] == {"epoch": 1, "batches": 1, "of": 2}  # the first epoch, counted from 1
    assert (
        torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)["phase"]["index"] == 0
    )
    budget = RunBudget(60.0, started=time.monotonic() - 10)
    budget.load_state_dict({"elapsed": 45.0, "cut": None})  # a resumed run: 45 s spent before, 10 now
    assert 54 < budget.elapsed() < 56 and not budget.exhausted()


@pytest.mark.slow
def test_a_run_killed_in_its_second_phase_resumes_there_and_ends_as_an_unstopped_one(tiny_root, tmp_path):
    """SIGKILL of the whole process group, as the OOM killer or a lost node would: the run resumes in
    the phase and epoch it reached and ends with the uninterrupted run's scores to 1e-5."""
    args = [
        f"data.root={tiny_root}",
        "schedule=probe_finetune",
        "schedule.probe.epochs=2",
        "schedule.finetune.epochs=2",
        "trainer.max_epochs=null",
        f"data.cache_dir={tmp_path / 'cache'}",
    ]
    whole = cli(*args, f"hydra.run.dir={tmp_path / 'whole'}", cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr[-3000:]
    kill = [
        "+callbacks.kill._target_=tests.helpers.KillAtEpoch",
        "+callbacks.kill.epoch=3",
        f"+callbacks.kill.marker={tmp_path / 'killed'}",
        "keep_last_checkpoint=false",  # the default: a killed run keeps its last.ckpt all the same
    ]
    first = cli(*args, *kill, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, new_session=True)
    assert first.returncode == -signal.SIGKILL and (tmp_path / "killed").exists()
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=False)
    assert (saved["phase"]["name"], saved["epoch"]) == ("finetune", 2)  # one fine-tuning epoch done
    resumed = cli(*args, f"resume={tmp_path / 'run'}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    results = [json.loads((tmp_path / run / "result.json").read_text()) for run in ("whole", "run")]
    assert results[0]["epochs"] == results[1]["epochs"] == 4
    for key in [k for k in results[0] if k.startswith("val/")] + ["best_score"]:
        assert results[1][key] == pytest.approx(results[0][key], abs=1e-5), key


@pytest.mark.slow
def test_ddp_ranks_hold_the_same_weights_after_every_epoch_of_both_phases(tiny_root, tmp_path):
    ddp = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true"]
    result = cli(
        f"data.root={tiny_root}",
        f"hydra.run.dir={tmp_path / 'run'}",
        *ddp,
        "experiment=lp_ft",
        "backbone=mobilenet_v3_small",
        "backbone.weights=null",
        "data.image_size=32",
        "data.batch_size=8",
        "schedule.probe.epochs=2",
        "schedule.finetune.epochs=2",
        "trainer.max_epochs=null",
        "schedule.finetune.lr_scale=1",
        f"data.cache_dir={tmp_path / 'cache'}",
        "+callbacks.weights._target_=tests.helpers.WeightRecorder",
        f"+callbacks.weights.folder={tmp_path / 'weights'}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MEMBER: 2/2" in result.stdout + result.stderr
    summary = json.loads((tmp_path / "run" / "result.json").read_text())
    assert summary["status"] == "done" and summary["epochs"] == 4
    assert (tmp_path / "run" / "checkpoints" / "best.ckpt").is_file()
    # the second process used the same folder (outputs/ holds the cache folder's labels index)
    assert not (tmp_path / "outputs" / "train").exists()
    ranks = [
        [json.loads(line) for line in (tmp_path / "weights" / f"rank{r}.jsonl").read_text().splitlines()]
        for r in (0, 1)
    ]
    assert ranks[0] == ranks[1]  # every epoch, every weight, bit for bit
    phases = [e["phase"] for e in ranks[0]]
    assert phases == ["probe", "probe", "finetune", "finetune"]
    backbone = [e["backbone"] for e in ranks[0]]
    assert backbone[0] == backbone[1]  # frozen while probing
    assert len({backbone[1], backbone[2], backbone[3]}) == 3  # trained, in step, while fine-tuning
    assert len({e["head"] for e in ranks[0]}) == 4
