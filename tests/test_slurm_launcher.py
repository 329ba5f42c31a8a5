"""The Slurm launcher's parts that need no cluster: job states from squeue where sacct cannot answer,
the time-limit signal held while a job starts, the record of a job stopped at its time limit, and
the launcher as Hydra finds it. Against a real Slurm: tests/test_slurm.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from submitit.core.utils import UncompletedJobError

from coco_multilabel.cli import CONFIG_DIR, report_user_errors
from coco_multilabel.errors import UserError
from coco_multilabel.sweeps import slurm
from coco_multilabel.sweeps.job import run_job
from tests.helpers import ROOT

NO_ACCOUNTING = "#!/bin/sh\necho 'Slurm accounting storage is disabled' >&2\nexit 1\n"


def fake_commands(folder, **scripts) -> None:
    """Executables ``name`` (sacct, squeue) on PATH that each append their arguments to ``calls``."""
    folder.mkdir(exist_ok=True)
    for name, body in scripts.items():
        path = folder / name
        path.write_text(body.replace("#!/bin/sh\n", f'#!/bin/sh\necho "{name} $*" >> {folder}/calls\n', 1))
        path.chmod(0o755)


def test_job_states_come_from_squeue_where_sacct_has_no_accounting(tmp_path, monkeypatch, caplog):
    squeue = "#!/bin/sh\nprintf '7_0|RUNNING\\n7_1|CANCELLED by 0\\n7_3|CONFIGURING\\n8|PENDING\\n'\n"
    fake_commands(tmp_path / "bin", sacct=NO_ACCOUNTING, squeue=squeue)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    watcher = slurm.SqueueWatcher()
    for job_id in ("7_0", "7_1", "7_2", "7_3", "8"):
        watcher.register_job(job_id)
    states = {job_id: watcher.get_state(job_id, mode="force") for job_id in ("7_0", "7_1", "7_2", "7_3", "8")}
    # 7_2 left squeue: it ended (a job that died without a result must not keep the sweep waiting)
    assert states == {
        "7_0": "RUNNING",
        "7_1": "CANCELLED",
        "7_2": "ENDED",
        "7_3": "RUNNING",  # CONFIGURING: a state submitit does not know, not ended
        "8": "PENDING",
    }
    assert [watcher.is_done(j, mode="cache") for j in states] == [False, True, True, False, False]
    time.sleep(0.01)  # submitit ignores a forced poll within 1 ms of the last
    watcher.get_state("7_0", mode="force")  # polls again: squeue only, sacct asked once
    calls = (tmp_path / "bin" / "calls").read_text().splitlines()
    assert [c.split()[0] for c in calls] == ["sacct", "squeue", "squeue"]
    assert "Bypassing sacct error" not in caplog.text


def test_job_states_come_from_sacct_where_it_answers(tmp_path, monkeypatch):
    sacct = "#!/bin/sh\nprintf 'JobID|State|NodeList\\n7_0|COMPLETED|n1\\n7_1|RUNNING|n2\\n'\n"
    fake_commands(tmp_path / "bin", sacct=sacct, squeue="#!/bin/sh\nexit 1\n")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    watcher = slurm.SqueueWatcher()
    assert [watcher.get_state(j, mode="force") for j in ("7_0", "7_1")] == ["COMPLETED", "RUNNING"]
    calls = (tmp_path / "bin" / "calls").read_text().splitlines()
    assert {c.split()[0] for c in calls} == {"sacct"}


def test_submitit_makes_every_job_of_a_sweep_one_that_squeue_follows(tmp_path, monkeypatch):
    """A single job and the tasks of an array: submitit builds them in two places."""
    from submitit.slurm.slurm import SlurmExecutor

    fake_commands(tmp_path / "bin", sbatch="#!/bin/sh\necho 'Submitted batch job 42'\n", srun="#!/bin/sh\n")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    executor = SlurmExecutor(folder=tmp_path / "jobs")
    with slurm.jobs_followed_by_squeue():
        single = executor.submit(print, "one")
        array = executor.map_array(print, ["a", "b"])
    assert [type(job) for job in (single, *array)] == [slurm.SlurmJob] * 3
    assert [job.job_id for job in array] == ["42_0", "42_1"]
    assert isinstance(SlurmExecutor(folder=tmp_path / "jobs").submit(print, "after"), slurm.SlurmJob) is False


HOLD = """
import os, signal, time
import coco_multilabel.sweeps.slurm as slurm
os.kill(os.getpid(), signal.SIGUSR2)   # Slurm's time-limit signal, before submitit's handler exists
time.sleep(0.2)
got = []
signal.signal(signal.SIGUSR2, lambda signum, frame: got.append(os.getpid()))   # submitit's handler
slurm.handle_time_limit_signal_here()
time.sleep(0.2)
worker = os.fork()   # a DataLoader worker: Slurm signals it too
if worker == 0:
    os.kill(os.getpid(), signal.SIGUSR2)
    time.sleep(0.2)
    os._exit(3 if len(got) > 1 else 0)
_, status = os.waitpid(worker, 0)
print(got == [os.getpid()] and status == 0 and not slurm.held_signals)
"""


@pytest.mark.slow  # a Python process of its own, signalled
def test_the_time_limit_signal_waits_for_submitits_handler_and_reaches_the_job_process_only():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SUBMITIT_EXECUTOR": "slurm"}
    held = subprocess.run([sys.executable, "-c", HOLD], env=env, capture_output=True, text=True, timeout=120)
    assert held.returncode == 0 and held.stdout.strip() == "True", held.stderr[-2000:]
    env.pop("SUBMITIT_EXECUTOR")  # not a submitit job: the signal keeps its default action
    plain = subprocess.run([sys.executable, "-c", HOLD], env=env, capture_output=True, text=True, timeout=120)
    assert plain.returncode == -signal.SIGUSR2


REQUEUED = """
import os, signal, sys, time
import coco_multilabel.sweeps.slurm as slurm
signal.signal(signal.SIGUSR2, lambda signum, frame: sys.exit(-1))   # submitit's, after scontrol requeue
slurm.handle_time_limit_signal_here()
try:
    os.kill(os.getpid(), signal.SIGUSR2)
    time.sleep(5)
except SystemExit:
    pass
try:   # what a DataLoader worker's death, Slurm's SIGTERM, makes of the unwinding
    slurm.end_if_requeued(RuntimeError("DataLoader worker (pid 1) is killed by signal: Terminated."))
except SystemExit as exit:
    print(f"ends with {exit.code}")
"""


@pytest.mark.slow  # a Python process of its own, signalled
def test_an_attempt_slurm_requeued_ends_without_a_result_whatever_breaks_while_it_unwinds(monkeypatch):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SUBMITIT_EXECUTOR": "slurm"}
    ended = subprocess.run(
        [sys.executable, "-c", REQUEUED], env=env, capture_output=True, text=True, timeout=120
    )
    assert ended.stdout.strip() == "ends with -1", ended.stderr[-2000:]

    @report_user_errors
    def main():
        raise RuntimeError("DataLoader worker (pid 1) is killed by signal: Terminated.")

    monkeypatch.setattr(slurm, "requeued", True)
    with pytest.raises(SystemExit):  # not an internal error, and no result for submitit to pickle
        main()


@pytest.mark.parametrize("timeout_min, delay_s", [(1, 60), (3, 60), (10, 75), (16, 120), (240, 120)])
def test_the_requeue_signal_comes_an_eighth_of_the_limit_early_from_60_to_120_s(timeout_min, delay_s):
    assert slurm.requeue_signal_delay(timeout_min) == delay_s


@pytest.mark.parametrize("launcher", ["slurm", "slurm_ddp"])
def test_both_slurm_launchers_are_this_projects_plugin_and_hydra_finds_it(launcher):
    from hydra.core.plugins import Plugins
    from hydra.plugins.launcher import Launcher

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    node = cfg.hydra.launcher
    found = {f"{c.__module__}.{c.__name__}" for c in Plugins.instance().discover(Launcher)}
    assert node._target_ in found and "submitit" in node._target_  # jobs/devices tell SLURM jobs by it
    assert (node.timeout_min, node.signal_delay_s, node.max_num_timeout) == (240, 120, 5)


def test_a_job_requeued_at_its_time_limit_is_pending_and_one_refused_says_what_to_raise(
    tmp_path, monkeypatch
):
    cfg = OmegaConf.create({"run_dir": str(tmp_path), "ckpt_path": None})
    monkeypatch.setattr(slurm, "requeue_asked", True)  # submitit called the launcher's checkpoint()
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")

    def stopped_by(err):
        def train(cfg):
            raise err

        return train

    # submitit's exit after scontrol requeue; or a DataLoader worker that Slurm's SIGTERM ended first
    for err in (
        SystemExit(-1),
        RuntimeError("DataLoader worker (pid 11040) is killed by signal: Terminated."),
    ):
        with pytest.raises(SystemExit):  # no result: the submitting side awaits the job's next attempt
            run_job(cfg, stopped_by(err))
        record = json.loads((tmp_path / "result.json").read_text())
        assert (record["status"], record["error"], record["requeued"]) == ("pending", None, 2)

    refused = UncompletedJobError("Job not requeued because: timed-out too many times.")
    with pytest.raises(UserError, match="raise hydra.launcher.timeout_min or hydra.launcher.max_num_timeout"):
        run_job(cfg, stopped_by(refused))
    record = json.loads((tmp_path / "result.json").read_text())
    assert record["status"] == "failed" and "timed-out too many times" in record["error"]

    monkeypatch.setattr(slurm, "requeue_asked", False)  # without a requeue, an exit stays a failure
    with pytest.raises(SystemExit):
        run_job(cfg, stopped_by(SystemExit(1)))
    assert json.loads((tmp_path / "result.json").read_text())["status"] == "failed"


def test_lightnings_own_requeue_is_off_in_submitit_jobs_only(monkeypatch):
    for name, value in {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "train", "SLURM_JOB_ID": "7"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    assert slurm.lightning_plugins() == []  # your own sbatch script: Lightning's default
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    (environment,) = slurm.lightning_plugins()
    assert not environment.auto_requeue
