"""make search: an Optuna study over the train config; parallel, resumable, pruned, submitted."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from coco_multilabel.decisions.submission import read_submission
from coco_multilabel.errors import UserError
from coco_multilabel.folders import member_paths
from coco_multilabel.search import prepare
from coco_multilabel.sweeps.study import (
    HEARTBEAT,
    Search,
    as_overrides,
    best_trials,
    distributions,
    fail_and_retry,
    next_trial,
    open_study,
    storage,
)
from coco_multilabel.sweeps.study_summary import write_study_summary
from tests.conftest import tiny
from tests.helpers import ROOT

HERE = {"host": socket.gethostname(), "pid": os.getpid(), "worker": 0}  # a worker that is alive
LR = "search.params={optimizer.lr: 'tag(log, interval(1.0e-9, 0.1))'}"


def search_cli(*args: str, cwd: Path, new_session: bool = False, env: dict | None = None):
    """``python -m coco_multilabel.search TINY ARGS`` on the worktree's code, as make search runs it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "coco_multilabel.search", *tiny(*args)],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=900, start_new_session=new_session,
    )  # fmt: skip


def read_csv(path: Path) -> list[dict]:
    with path.open() as file:
        return list(csv.DictReader(file))


def small_search(study_dir: Path, **changes) -> Search:
    search = Search(dir=study_dir, space={"model.dropout": "interval(0.0, 0.5)"}, args=["data.root=x"],
                    objective="val/loss", direction="minimize", trials=2,
                    sampler={"_target_": "optuna.samplers.RandomSampler", "seed": 0})  # fmt: skip
    return dataclasses.replace(search, **changes)


def dead_pid() -> int:
    process = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    return int(process.stdout)


# --- the space, the study, its workers (no training) ----------------------------------------------


def test_a_space_in_hydra_sweep_syntax_becomes_optuna_distributions():
    space = {
        "optimizer.lr": "tag(log, interval(1.0e-4, 1.0e-2))", "model.dropout": "interval(0.0, 0.5)",
        "model.top_stages": "int(interval(1, 3))", "data.image_size": "range(128, 385, 128)",
        "loss": "choice(bce, asl)",
    }  # fmt: skip
    assert distributions(space) == {
        "optimizer.lr": FloatDistribution(1e-4, 1e-2, log=True),
        "model.dropout": FloatDistribution(0.0, 0.5),
        "model.top_stages": IntDistribution(1, 3),
        "data.image_size": IntDistribution(128, 384, step=128),
        "loss": CategoricalDistribution(["bce", "asl"]),
    }
    overrides = as_overrides({"optimizer.lr": 0.00123, "loss": "asl", "data.image_size": 256})
    assert overrides == ["optimizer.lr=0.00123", "loss=asl", "data.image_size=256"]
    for expression, message in [("0.1", "one value, not a range"), ("interval(0.5, 0.1)", "low to high"),
                                ("choice(", "not Hydra sweep syntax")]:  # fmt: skip
        with pytest.raises(UserError, match=message):
            distributions({"model.dropout": expression})


@pytest.mark.parametrize("space", ["lr_wd_dropout", "recipe"])
def test_the_packaged_spaces_compose_and_pass_the_checks_at_every_end(space, tiny_root, tmp_path):
    args = tiny(f"data.root={tiny_root}", f"search={space}", f"search.dir={tmp_path}", "experiment=top_csra")
    search, workers, devices = prepare(args)
    assert search.space and search.args[0] == f"data.root={tiny_root}" and search.dir == tmp_path
    assert search.objective == "val/macro_f1_xfit" and search.direction == "maximize" and not search.folds
    assert workers == 1 and devices.keys == [] and search.sampler["seed"] == 0  # CPU: one trial at a time
    folds, workers, _ = prepare([*args, "search.folds=3", "search.workers=2"])
    assert folds.folds == 3 and folds.objective == "oof/macro_f1_xfit" and workers == 2
    default = prepare([f"data.root={tiny_root}", f"search.dir={tmp_path}", "search.folds=3"])[0]
    assert (
        default.args[-1] == "experiment=top_csra"
    )  # the folds train the recipe train does, as make cv is told


@pytest.mark.parametrize(
    "extra, message",
    [
        (["search=nope"], "no search space 'nope': SPACE= one of lr_wd_dropout, recipe"),
        (
            ["~search.params", "+search.params={optimizer.lrr: 'interval(0.1, 0.2)'}"],
            r"a trial with optimizer.lrr=0.1 does not compose \(Could not override 'optimizer.lrr'",
        ),
        (["trainer=ddp"], "trains each trial on one device"),
        (["-m"], "search.dir"),
        (["resume=outputs/train/x"], "DIR/<number>"),
        (["search.pruner._target_=os.system"], "name a class of optuna.pruners"),
    ],
)
def test_a_search_refuses_what_would_fail_in_a_trial_before_the_first(extra, message, tiny_root, tmp_path):
    with pytest.raises(UserError, match=message):
        prepare(tiny(f"data.root={tiny_root}", f"search.dir={tmp_path}", *extra))
    assert not (tmp_path / "study.journal").exists()


def test_a_study_continues_only_with_the_settings_its_trials_were_made_with(tmp_path):
    search = small_search(tmp_path)
    open_study(tmp_path, create=search)
    open_study(tmp_path, create=dataclasses.replace(search, trials=50))  # more trials: the same study
    with pytest.raises(UserError, match="another args .*data.root=x.*or pass a new DIR"):
        open_study(tmp_path, create=dataclasses.replace(search, args=["data.root=y"]))
    with pytest.raises(UserError, match="holds no study"):
        open_study(tmp_path / "elsewhere")


def test_a_trial_whose_worker_is_gone_is_failed_and_retried_once_with_its_params(tmp_path):
    search = small_search(tmp_path, trials=2)
    study = open_study(tmp_path, create=search)
    first = next_trial(study, search, {**HERE, "pid": dead_pid()})  # its worker died (same machine)
    retry = next_trial(study, search, HERE)
    trials = study.get_trials()
    assert trials[0].state == TrialState.FAIL and retry.number == 1 and retry.params == first.params
    assert trials[1].system_attrs["failed_trial"] == 0 and trials[1].user_attrs["worker"] == HERE
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / HEARTBEAT).touch()  # a live worker's trial is left alone
    second = next_trial(study, search, HERE)
    assert second.number == 2 and second.params != first.params
    assert next_trial(study, search, HERE) is None  # 2 trials running: the study has its trials
    assert [t.state for t in study.get_trials()] == [TrialState.FAIL, TrialState.RUNNING, TrialState.RUNNING]
    # the retry is stopped too: it stays failed (retried once) and counts, so a third trial starts
    fail_and_retry(study, study.get_trials()[1], "test")
    assert [t.state for t in study.get_trials()] == [TrialState.FAIL, TrialState.FAIL, TrialState.RUNNING]
    study.tell(2, 0.5)
    assert next_trial(study, search, HERE) is None  # trial 1 (failed, not retried) and trial 2 count


def test_a_trial_on_another_machine_is_failed_when_its_heartbeat_is_older_than_stale_after_s(tmp_path):
    search = small_search(tmp_path, trials=3, stale_after_s=60)
    study = open_study(tmp_path, create=search)
    far = {"host": "gpu07", "pid": 1, "worker": 0}
    trial = next_trial(study, search, far)
    (tmp_path / "0").mkdir()
    beat = tmp_path / "0" / HEARTBEAT
    beat.touch()
    os.utime(beat, (time.time() - 30, time.time() - 30))
    next_trial(study, search, HERE)
    assert study.get_trials()[0].state == TrialState.RUNNING  # 30 s: still beating
    os.utime(beat, (time.time() - 90, time.time() - 90))
    retry = next_trial(study, search, HERE)
    assert study.get_trials()[0].state == TrialState.FAIL and retry.params == trial.params


def test_trial_n_draws_with_seed_plus_n_so_a_relaunch_draws_new_params(tmp_path):
    tpe = {"_target_": "optuna.samplers.TPESampler", "seed": 0, "n_startup_trials": 5}
    draws = []
    for name in ("a", "b"):
        search = small_search(tmp_path / name, trials=5, sampler=tpe)
        study = open_study(search.dir, create=search)
        first = next_trial(study, search, HERE)
        study.tell(first, 0.5)
        relaunched = open_study(search.dir)  # a new process: its sampler starts afresh
        draws.append((first.params, next_trial(relaunched, search, HERE).params))
    assert draws[0][1] != draws[0][0]  # not the finished trial's params again
    assert draws[0] == draws[1]  # and reproducible


def test_the_summary_lists_every_trial_best_first_with_what_became_of_it(tmp_path):
    search = small_search(tmp_path, trials=4, objective="val/macro_f1_xfit", direction="maximize")
    study = open_study(tmp_path, create=search)
    for value in (0.3, 0.6):
        trial = next_trial(study, search, HERE)
        trial.set_user_attr("checkpoint", f"{tmp_path}/{trial.number}/checkpoints/best.ckpt")
        trial.report(value / 2, 1)
        study.tell(trial, value)
    pruned = next_trial(study, search, HERE)
    pruned.report(0.1, 1)
    pruned.set_user_attr("pruned_at_epoch", 1)
    study.tell(pruned, state=TrialState.PRUNED)
    next_trial(study, search, {**HERE, "pid": dead_pid()})
    next_trial(study, search, HERE)  # fails trial 3, runs its retry
    path = write_study_summary(tmp_path)
    rows = read_csv(tmp_path / "summary.csv")
    assert [(r["rank"], r["trial"], r["state"]) for r in rows] == [
        ("1", "1", "complete"), ("2", "0", "complete"), ("", "2", "pruned"), ("", "3", "failed"),
        ("", "4", "running")]  # fmt: skip
    notes = ["pruned after epoch 1", "its worker stopped; retried as trial 4", "retry of trial 3"]
    assert [r["note"] for r in rows[2:]] == notes
    assert rows[0]["checkpoint"].endswith("1/checkpoints/best.ckpt") and float(rows[0]["model.dropout"]) >= 0
    markdown = path.read_text()
    head = "# Search: 3 of 4 trials finished (2 complete, 1 pruned, 1 running; 1 failed and retried)"
    assert markdown.startswith(head)
    assert "Best: trial 1, val/macro_f1_xfit = 0.6000" in markdown and "selected on val" in markdown
    for name in ("history.png", "importance.png", "slice.png", "intermediate.png"):
        assert f"]({name})" in markdown and (tmp_path / name).stat().st_size > 1000
    assert best_trials(tmp_path, 2) == [tmp_path / "1", tmp_path / "0"]
    with pytest.raises(UserError, match="2 complete trials, fewer than TOP=3"):
        best_trials(tmp_path, 3)


# --- searches that train ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def parallel_study(tiny_root, tmp_path_factory):
    """4 trials, 2 workers side by side, a device pool of two devices: the study folder."""
    tmp = tmp_path_factory.mktemp("parallel")
    study_dir = tmp / "study"
    result = search_cli(f"data.root={tiny_root}", f"search.dir={study_dir}", "search.trials=4",
                        "search.workers=2", "device_pool.ids=[0,1]", f"device_pool.lock_dir={tmp / 'locks'}",
                        "device_pool.poll_s=0.05", cwd=tmp)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return study_dir, result


@pytest.mark.slow
def test_four_trials_on_two_workers_train_side_by_side_one_per_device(parallel_study, tiny_root):
    study_dir, result = parallel_study
    study = optuna.load_study(study_name="search", storage=storage(study_dir))
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 4
    for t in trials:  # each trial is a train run in its own folder, as a sweep job is
        record = json.loads((study_dir / str(t.number) / "result.json").read_text())
        assert record["status"] == "done" and record["best_score"] == pytest.approx(t.value)
        assert (
            set(as_overrides(t.params)) <= set(record["overrides"])
            and f"data.root={tiny_root}" in record["overrides"]
        )
        assert Path(record["best_checkpoint"]).is_file() and t.user_attrs["device"] in ("0", "1")
        assert list(t.intermediate_values) == [1]  # the val objective after its one epoch
    spans = {d: sorted((t.datetime_start, t.datetime_complete) for t in trials if t.user_attrs["device"] == d)
             for d in ("0", "1")}  # fmt: skip
    for device in spans.values():  # never two trials on one device at the same time
        assert all(end <= start for (_, end), (start, _) in zip(device, device[1:], strict=False))
    assert any(a[0] < b[1] and b[0] < a[1] for a in spans["0"] for b in spans["1"])  # side by side
    rows = read_csv(study_dir / "summary.csv")
    assert [r["state"] for r in rows] == ["complete"] * 4 and [r["rank"] for r in rows] == [
        "1",
        "2",
        "3",
        "4",
    ]
    assert "Search: 4 of 4 trials finished (4 complete)" in result.stdout


@pytest.mark.slow
def test_submit_of_a_study_writes_a_valid_json_from_its_best_trials(parallel_study, tiny_root, tmp_path):
    study_dir, _ = parallel_study
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    stems = sorted(p.stem for p in (tiny_root / "images" / "test").glob("*.jpg"))
    best = best_trials(study_dir, 2)
    for top, out in ((None, tmp_path / "best.json"), (2, tmp_path / "top2.json")):
        command = [sys.executable, "-m", "coco_multilabel.submit", f"ckpt_path={study_dir}",
                   f"data.root={tiny_root}", f"output={out}", "data.num_workers=0",
                   *([f"submit.top={top}"] if top else [])]  # fmt: skip
        result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        assert len(read_submission(out, stems)) == len(stems)
        said = result.stdout + result.stderr
        assert f"trial {best[0].name} of {study_dir}" in said and "selected on its val split" in said
    assert f"trial {best[1].name} of" in said and "the mean of 2 models" in said


@pytest.mark.slow
def test_report_of_a_study_shows_its_trials_and_optunas_plots(parallel_study):
    from coco_multilabel.reporting.report import report

    study_dir, _ = parallel_study
    page = report(study_dir, progress=False).read_text()
    assert page.count("<tr>") == 5 and "4 trials, best first by val/macro_f1_xfit" in page
    assert page.count("data:image/png;base64") == 4


@pytest.mark.slow
def test_a_hopeless_learning_rate_is_pruned_and_its_trial_keeps_its_folder(tiny_root, tmp_path):
    """Objective val/loss (it moves within three epochs of this tiny data); trial 0 learns at lr
    0.01, trial 1 at 1e-8 does not, and is pruned after epoch 2 against trial 0's loss there."""
    study_dir = tmp_path / "study"
    args = [f"data.root={tiny_root}", f"search.dir={study_dir}", "~search.params", f"+{LR}",
            "search.workers=1", "monitor=val/loss", "callbacks.model_checkpoint.mode=min", "loss=bce",
            "scheduler=none", "trainer.max_epochs=3", "search.pruner.n_startup_trials=1",
            "search.pruner.n_warmup_steps=2"]  # fmt: skip
    created = search_cli(*args, "search.trials=0", cwd=tmp_path)  # the study, no trial yet
    assert created.returncode == 0, created.stderr[-3000:]
    study = optuna.load_study(study_name="search", storage=storage(study_dir))
    study.enqueue_trial({"optimizer.lr": 0.01})
    study.enqueue_trial({"optimizer.lr": 1e-8})
    result = search_cli(*args, "search.trials=2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    good, hopeless = study.get_trials()
    assert good.state == TrialState.COMPLETE and list(good.intermediate_values) == [1, 2, 3]
    assert hopeless.state == TrialState.PRUNED and list(hopeless.intermediate_values) == [1, 2]
    assert hopeless.intermediate_values[2] > good.intermediate_values[2]
    record = json.loads((study_dir / "1" / "result.json").read_text())
    assert record["status"] == "pruned" and record["pruned_at_epoch"] == 2 and record["epochs"] == 2
    assert (study_dir / "1" / "checkpoints" / "best.ckpt").is_file()  # its folder is kept
    assert "trial 1 pruned after epoch 2" in result.stderr
    rows = {r["trial"]: r for r in read_csv(study_dir / "summary.csv")}
    assert rows["1"]["state"] == "pruned" and rows["1"]["note"] == "pruned after epoch 2"


@pytest.mark.slow
def test_a_search_killed_after_its_first_trial_and_launched_again_ends_with_exactly_four_trials(
    tiny_root, tmp_path
):
    """Relaunched as two tasks of scripts/search.sbatch: two processes, workers of one study."""
    study_dir, marker = tmp_path / "study", tmp_path / "killed"
    kill = ["+callbacks.kill._target_=tests.helpers.KillAtEpoch", "+callbacks.kill.epoch=0",
            f"+callbacks.kill.marker={marker}", "+callbacks.kill.run_dir_name=1"]  # fmt: skip
    args = [f"data.root={tiny_root}", f"search.dir={study_dir}", "search.trials=4", "search.workers=1", *kill]
    first = search_cli(*args, cwd=tmp_path, new_session=True)
    assert first.returncode != 0 and marker.exists()  # the search and trial 1 were killed
    study = optuna.load_study(study_name="search", storage=storage(study_dir))
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE, TrialState.RUNNING]
    done = (study_dir / "0" / "result.json").read_text()
    best_0 = (study_dir / "0" / "checkpoints" / "best.ckpt").stat().st_mtime_ns

    # launched again as SLURM would after a preemption: two tasks of the array, two processes
    tasks = [subprocess.Popen(["bash", str(ROOT / "scripts" / "search.sbatch"), *tiny(*args)], cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHON": sys.executable,
                                   "SLURM_JOB_ID": "4242", "SLURM_ARRAY_TASK_ID": str(task)})
             for task in range(2)]  # fmt: skip
    said = "".join(task.communicate(timeout=900)[0] for task in tasks)
    assert [task.returncode for task in tasks] == [0, 0], said[-3000:]
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, *[TrialState.COMPLETE] * 3]
    assert trials[2].params == trials[1].params and trials[2].system_attrs["failed_trial"] == 1
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 4  # nothing else trained twice
    assert (study_dir / "0" / "result.json").read_text() == done  # trial 0 not trained again
    assert (study_dir / "0" / "checkpoints" / "best.ckpt").stat().st_mtime_ns == best_0
    assert not (study_dir / "5").exists()
    assert "trial 1: its worker stopped" in said
    assert {t.user_attrs["worker"]["pid"] for t in trials[2:]} <= {task.pid for task in tasks}
    notes = {r["trial"]: r["note"] for r in read_csv(study_dir / "summary.csv")}
    assert notes["1"] == "its worker stopped; retried as trial 2" and notes["2"] == "retry of trial 1"
    rerun = search_cli(*args, cwd=tmp_path)  # a finished study: nothing more
    assert rerun.returncode == 0 and len(study.get_trials()) == 5


@pytest.mark.slow
def test_a_trial_scored_out_of_fold_is_a_cv_folder_and_submits_as_its_fold_models(tiny_root, tmp_path):
    study_dir = tmp_path / "study"
    args = [f"data.root={tiny_root}", f"search.dir={study_dir}", "search.trials=1", "search.folds=2"]
    result = search_cli(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (trial,) = optuna.load_study(study_name="search", storage=storage(study_dir)).get_trials()
    cv = json.loads((study_dir / "0" / "cv.json").read_text())
    assert trial.state == TrialState.COMPLETE and trial.value == pytest.approx(cv["score_xfit"])
    assert [f["fold"] for f in cv["folds"]] == [
        0,
        1,
    ] and not trial.intermediate_values  # scored once, at its end
    folds = [Path(f["checkpoint"]) for f in cv["folds"]]
    assert member_paths(str(study_dir)) == folds and all(p.is_relative_to(study_dir / "0") for p in folds)
    assert "`oof/macro_f1_xfit` (maximize), each trial scored out of fold over 2 folds" in result.stdout
