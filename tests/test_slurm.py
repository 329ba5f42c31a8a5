"""The cluster path against a real Slurm: ``.ci/slurm.sh start`` (``make slurm-up``) runs a one-node
cluster here, and ``.ci/run`` runs these with it. Skipped where no Slurm answers.

A grid whose jobs are Slurm array tasks, one of them cut by its time limit and back by itself; a job
Slurm kills; one run as two Slurm tasks joined by DDP over gloo; ``make search``'s workers as the
tasks of one job array, as ``scripts/search.sbatch`` says to submit them."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time

import optuna
import pytest
from optuna.trial import TrialState

from coco_multilabel.decisions.submission import validate_submission
from coco_multilabel.sweeps.study import storage
from tests.conftest import tiny
from tests.helpers import ROOT, cli

PARTITION = "debug"  # .ci/slurm.sh's
ON_SLURM = [
    "hydra/launcher=slurm", f"hydra.launcher.partition={PARTITION}", "hydra.launcher.gpus_per_node=0",
    "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=4",
]  # fmt: skip


def slurm_missing() -> str | None:
    """Why these tests cannot run here, or None when partition PARTITION answers."""
    if not shutil.which("sbatch"):
        return "no Slurm here (no sbatch): .ci/slurm.sh start (make slurm-up) runs one"
    sinfo = subprocess.run(["sinfo", "-h", "-p", PARTITION, "-o", "%a"], capture_output=True, text=True)
    if sinfo.returncode != 0 or "up" not in sinfo.stdout:
        why = sinfo.stderr.strip().splitlines()[-1:] or ["no such partition"]
        return f"no Slurm partition {PARTITION} answers ({why[0]}): .ci/slurm.sh start (make slurm-up)"
    return None


pytestmark = [pytest.mark.slurm, pytest.mark.skipif(bool(slurm_missing()), reason=str(slurm_missing()))]


def test_a_grid_runs_as_slurm_jobs_and_a_job_cut_by_its_time_limit_comes_back_by_itself(tiny_root, tmp_path):
    """Two jobs of the plain recipe, the same but for a first attempt of job 1 that sleeps after
    its first epoch past its 3-minute limit (Slurm looks at limits once a minute and signals up to
    90 s before): Slurm signals it, submitit requeues it, it resumes from its last.ckpt and ends
    where the uncut job 0 ends, with the same scores. A DataLoader worker each: Slurm signals them too."""
    sweep = tmp_path / "sweep"
    stall = ["+callbacks.stall._target_=tests.helpers.StallFirstAttempt", "+callbacks.stall.epoch=1"]
    result = cli(
        "experiment=plain", f"data.root={tiny_root}", "trainer.max_epochs=3", "data.num_workers=1", *ON_SLURM,
        "hydra.launcher.timeout_min=3", *stall, "+callbacks.stall.seconds=0,600", f"hydra.sweep.dir={sweep}",
        "-m", cwd=tmp_path,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "Bypassing sacct error" not in output  # this cluster keeps no accounting: squeue answers
    uncut, cut = (json.loads((sweep / job / "result.json").read_text()) for job in ("0", "1"))
    assert uncut["status"] == cut["status"] == "done"
    assert uncut["resumed_from"] is None and cut["resumed_from"] == str(sweep / "1/checkpoints/last.ckpt")
    assert cut["epochs"] == uncut["epochs"] == 3
    metrics = sorted(k for k in uncut if k.startswith("val/"))
    assert metrics and {k: cut[k] for k in metrics} == {k: uncut[k] for k in metrics}
    log = (sweep / "1" / "train.log").read_text()
    for line in (
        "Caught signal SIGUSR2",
        "submitit requeues this job",
        "Requeued job",
        "resuming the interrupted job",
    ):
        assert line in log, line
    assert "Caught signal" not in (sweep / "0" / "train.log").read_text()

    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert [(r["job"], r["status"]) for r in rows] == [("0", "done"), ("1", "done")]
    for job in ("0", "1"):
        assert (sweep / job / "checkpoints" / "best.ckpt").is_file()
    out = tmp_path / "submission.json"
    submit = subprocess.run(
        [sys.executable, "-m", "coco_multilabel.submit", f"ckpt_path='{rows[0]['best_checkpoint']}'",
         f"data.root={tiny_root}", f"output={out}"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
    )  # fmt: skip
    assert submit.returncode == 0, submit.stderr[-3000:]
    validate_submission(
        json.loads(out.read_text()), sorted(p.stem for p in (tiny_root / "images/test").glob("*.jpg"))
    )


def test_a_job_slurm_kills_is_recorded_as_failed_and_ends_the_sweep_with_one_line(tiny_root, tmp_path):
    """scancel, as an out-of-memory kill or a lost node would: the job leaves no result. The sweep
    learns it from squeue (no accounting here), records it and exits 1, instead of waiting forever."""
    sweep = tmp_path / "sweep"
    stall = ["+callbacks.stall._target_=tests.helpers.StallFirstAttempt", "+callbacks.stall.epoch=0"]
    command = [
        sys.executable, "-m", "coco_multilabel.train", *tiny(f"data.root={tiny_root}", *ON_SLURM, *stall),
        "+callbacks.stall.seconds=600", f"hydra.sweep.dir={sweep}", "-m",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as sweeping:
        record = sweep / "0" / "result.json"
        deadline = time.monotonic() + 300
        while not (record.is_file() and json.loads(record.read_text())["status"] == "running"):
            assert sweeping.poll() is None and time.monotonic() < deadline, sweeping.stdout.read()[-3000:]
            time.sleep(1)
        (job,) = [p.name for p in (sweep / ".submitit").iterdir() if p.is_dir()]
        subprocess.run(["scancel", job], check=True)
        output, _ = sweeping.communicate(timeout=300)
    assert sweeping.returncode == 1, output[-3000:]
    assert "Slurm ended the job without a result (state CANCELLED)" in output, output[-3000:]
    assert "Traceback" not in output
    record = json.loads(record.read_text())
    assert record["status"] == "failed" and "state CANCELLED" in record["error"]


def test_one_run_as_two_slurm_tasks_joined_by_ddp_over_gloo(tiny_root, tmp_path):
    sweep, weights = tmp_path / "ddp", tmp_path / "weights"
    result = cli(
        f"data.root={tiny_root}", "hydra/launcher=slurm_ddp", "trainer=ddp", "trainer.accelerator=cpu",
        "trainer.devices=2", "trainer.max_epochs=2", f"hydra.launcher.partition={PARTITION}",
        "hydra.launcher.gpus_per_node=0", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=4",
        "+callbacks.weights._target_=tests.helpers.WeightRecorder", f"+callbacks.weights.folder={weights}",
        f"hydra.sweep.dir={sweep}", "-m", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    (job,) = [p for p in (sweep / ".submitit").iterdir() if p.is_dir()]
    logs = {task: (job / f"{job.name}_{task}_log.err").read_text() for task in (0, 1)}
    for task, log in logs.items():
        assert f"GLOBAL_RANK: {task}, MEMBER: {task + 1}/2" in log, log[-2000:]
        assert "SLURM auto-requeueing enabled" not in log  # submitit requeues; Lightning's handler is off
    assert "distributed_backend=gloo" in logs[0]
    ranks = [
        [json.loads(line) for line in (weights / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)
    ]
    assert len(ranks[0]) == 2 and ranks[0] == ranks[1]  # both epochs, every weight, bit for bit
    record = json.loads((sweep / "0" / "result.json").read_text())
    assert record["status"] == "done" and record["epochs"] == 2


def test_search_workers_as_the_tasks_of_a_slurm_job_array_share_one_study(tiny_root, tmp_path):
    """scripts/search.sbatch as its comment says to submit it, its GPU and memory asks replaced for
    this CPU node: two array tasks, each a worker, together finish exactly the study's 3 trials."""
    study_dir = tmp_path / "study"
    submitted = subprocess.run(
        ["sbatch", "--parsable", "--wait", "--array=0-1", f"--partition={PARTITION}", "--gres=none",
         "--cpus-per-task=1", "--mem=4G", f"--output={tmp_path}/%x-%A_%a.out",
         f"--export=ALL,PYTHONPATH={ROOT},PYTHON={sys.executable}", str(ROOT / "scripts" / "search.sbatch"),
         *tiny(f"data.root={tiny_root}", f"search.dir={study_dir}", "search.trials=3")],
        cwd=tmp_path, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    logs = {p.name: p.read_text() for p in tmp_path.glob("search-*.out")}
    assert submitted.returncode == 0, (submitted.stderr, {k: v[-2000:] for k, v in logs.items()})
    job = submitted.stdout.strip().split(";")[0]
    assert sorted(logs) == [f"search-{job}_0.out", f"search-{job}_1.out"]
    trials = optuna.load_study(study_name="search", storage=storage(study_dir)).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    assert len({(t.user_attrs["worker"]["host"], t.user_attrs["worker"]["pid"]) for t in trials}) == 2
    rows = list(csv.DictReader((study_dir / "summary.csv").open()))
    assert sorted(r["trial"] for r in rows) == ["0", "1", "2"] and {r["state"] for r in rows} == {"complete"}
