"""Sweeps on a Slurm cluster: Hydra's submitit launcher, with what a real cluster needs on top.

``hydra/launcher=slurm`` (and ``slurm_ddp``) submit every job of a multirun as a Slurm job. Beyond
Hydra's launcher:

- **Job states without accounting.** submitit follows its jobs with ``sacct``, which many small
  clusters cannot answer (no slurmdbd): it then warns at every poll and knows a job only by its
  result file, so a job that Slurm killed before writing one keeps the sweep waiting forever. Here
  the states come from ``squeue`` instead.
- **Time limits.** Slurm sends USR2 ``signal_delay_s`` before a job's limit (``--signal``); submitit
  catches it, requeues the job (at most ``max_num_timeout`` times) and the job, started again, resumes
  from its ``checkpoints/last.ckpt`` (``sweeps/job.py``). A signal that arrives while the job is still
  starting (a short limit, a slow start) is held until submitit's handler is in place, instead of
  killing the job; the DataLoader's workers, which Slurm signals too, leave it to the job. Lightning's
  own auto-requeue listens for USR1, which is never sent: it is turned off, so that the log names the
  one mechanism that acts.
- **Jobs killed** (cancelled, out of memory, a node lost) leave no result: recorded as failed, they
  end the sweep with exit 1 once the other jobs are done, not with a traceback.
"""

from __future__ import annotations

import contextlib
import getpass
import logging
import os
import signal
import subprocess
import threading
from pathlib import Path

from hydra.core.utils import JobReturn, JobStatus
from omegaconf import open_dict
from submitit.core.utils import UncompletedJobError
from submitit.slurm import slurm as submitit_slurm

from coco_multilabel.errors import UserError

log = logging.getLogger(__name__)

# Slurm's job states after which a job runs no more (squeue shows them for MinJobAge, 300 s by default)
ENDED = {"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY", "TIMEOUT"}
# and those submitit knows for a job not ended; any other (CONFIGURING, SUSPENDED, ...) reads as RUNNING
NOT_ENDED = {"PENDING", "RUNNING", "REQUEUED", "COMPLETING", "PREEMPTED"}


class SqueueWatcher(submitit_slurm.SlurmInfoWatcher):
    """submitit's watcher, asking ``squeue`` where ``sacct`` has no accounting database to ask."""

    def __init__(self, delay_s: int = 600):
        super().__init__(delay_s)
        self._sacct: bool | None = None  # found out at the first poll

    def _make_command(self) -> list[str] | None:
        command = super()._make_command()  # sacct, for the jobs not known to have ended
        if command is None or self._has_sacct(command):
            return command
        return [
            "squeue",
            "--noheader",
            "--array",
            "--states=all",
            "--format=%i|%T",
            f"--user={getpass.getuser()}",
        ]

    def _has_sacct(self, command: list[str]) -> bool:
        if self._sacct is None:
            probe = subprocess.run(command, capture_output=True, text=True)
            self._sacct = probe.returncode == 0
            if not self._sacct:
                log.info("sacct: %s: job states come from squeue", probe.stderr.strip() or probe.returncode)
        return self._sacct

    def read_info(self, string: bytes | str) -> dict[str, dict[str, str]]:
        if self._sacct:
            return super().read_info(string)
        text = string.decode() if isinstance(string, bytes) else string
        info = {}
        for line in text.splitlines():
            job_id, _, state = line.partition("|")
            state = state.split(" ")[0]  # "CANCELLED by 0"
            info[job_id] = {"JobID": job_id, "State": state if state in ENDED | NOT_ENDED else "RUNNING"}
        for job_id in self._registered - self._finished - info.keys():
            info[job_id] = {"JobID": job_id, "State": "ENDED"}  # left squeue: ended over MinJobAge ago
        return info


requeue_asked = False  # submitit called the launcher's checkpoint(): the job is requeued, or refused that
# Slurm requeued this job: this attempt ends without a result, whatever breaks while it unwinds (Slurm's
# SIGTERM ends the DataLoader's workers, whose death the main process reports as an error)
requeued = False


class SlurmJob(submitit_slurm.SlurmJob):
    """submitit's Slurm job, followed by a SqueueWatcher. One that Slurm ended without a result
    (cancelled, out of memory, a time limit with no requeue left, a node lost) is recorded as failed
    and returns nothing, as a job stopped by a user error does, instead of stopping the sweep with
    a traceback: the other jobs are still awaited, and the sweep exits 1 naming it."""

    watcher = SqueueWatcher()

    def results(self):
        try:
            return super().results()
        except UncompletedJobError:
            return [self._ended_without_result()]

    def _ended_without_result(self) -> JobReturn:
        # imported here: job.py imports this module, and a job must hold the signal before torch loads
        from coco_multilabel.io import write_json_atomic
        from coco_multilabel.sweeps.job import RESULT, read_result

        delayed = self.submission()
        launcher, (overrides, _, num) = delayed.function, delayed.args[:3]
        state = self.watcher.get_state(self.job_id, mode="cache")
        error = f"Slurm ended the job without a result (state {state}); its log: {self.paths.stderr}"
        log.error("job %s: %s; the same command resumes it", num, error)
        config = launcher.hydra_context.config_loader.load_sweep_config(launcher.config, list(overrides))
        with open_dict(config.hydra.job):
            config.hydra.job.num = num
        job_dir = Path(config.hydra.sweep.dir) / str(config.hydra.sweep.subdir)
        record = read_result(job_dir) or {"overrides": list(overrides)}
        if record.get("status") != "done":
            write_json_atomic(job_dir / RESULT, {**record, "status": "failed", "error": error}, indent=1)
        return JobReturn(overrides=list(overrides), status=JobStatus.COMPLETED, _return_value=None)


@contextlib.contextmanager
def jobs_followed_by_squeue():
    """While Hydra's launcher submits and awaits a sweep, submitit makes its jobs of SlurmJob above:
    a single job through its executor's ``job_class``, the tasks of an array by the module's name."""
    original = submitit_slurm.SlurmJob
    submitit_slurm.SlurmExecutor.job_class = submitit_slurm.SlurmJob = SlurmJob
    try:
        yield
    finally:
        submitit_slurm.SlurmExecutor.job_class = submitit_slurm.SlurmJob = original


def handle_time_limit_signal_here() -> None:
    """In the job, once submitit's signal handlers are in place: its time-limit handler acts in this
    process only, and a signal held while the job started reaches it now. Slurm signals every process
    of the job, and the DataLoader's workers, forked from it, would each requeue the job and exit."""
    number = time_limit_signal()
    submitits, job_pid = signal.getsignal(number), os.getpid()

    def in_job_process_only(signum, frame):
        global requeued
        if os.getpid() == job_pid and callable(submitits):
            try:
                submitits(signum, frame)
            except SystemExit:  # submitit exits this way only once scontrol requeued the job
                requeued = True
                raise

    signal.signal(number, in_job_process_only)
    if held_signals:
        log.warning("the time-limit signal came while the job was starting: it is requeued now")
        os.kill(job_pid, held_signals.pop())


def note_requeue(params: dict) -> None:
    """submitit calls the launcher's checkpoint() when Slurm's time limit (or a preemption) is near:
    say so in the job's log, in our words, and remember it for the job's record."""
    global requeue_asked
    requeue_asked = True
    log.warning(
        "Slurm's time limit (timeout_min=%s) or a preemption is near: submitit requeues this job, which "
        "then resumes from checkpoints/last.ckpt (requeued %d times so far; at most %s after time limits)",
        params.get("timeout_min"), restarts(), params.get("max_num_timeout"),
    )  # fmt: skip


def restarts() -> int:
    """How many times Slurm requeued this job so far (0 outside Slurm)."""
    return int(os.environ.get("SLURM_RESTART_COUNT", 0))


def end_if_requeued(err: BaseException | None = None) -> None:
    """Exit as submitit does after a requeue, so that no result is written: the next attempt's is."""
    if requeued:
        raise SystemExit(-1) from err


def time_limit_outcome(err: BaseException) -> tuple[dict, BaseException | None]:
    """What a job's record says when ``err`` stopped it after submitit was asked to requeue it at
    Slurm's time limit, and the exception to end the job with instead of ``err``: requeued, it is
    pending again and exits without a result (whatever broke meanwhile: Slurm's SIGTERM also ends the
    DataLoader's workers); refused a requeue, it failed, and the user is told what to raise.
    ({}, None) for an ``err`` of another kind."""
    if not requeue_asked:
        return {}, None
    if isinstance(err, UncompletedJobError):
        error = (
            f"{err} The job reached Slurm's time limit again: raise hydra.launcher.timeout_min or "
            "hydra.launcher.max_num_timeout; the same command resumes it from its last.ckpt"
        )
        return {"status": "failed", "error": error}, UserError(error)
    return {"status": "pending", "error": None, "requeued": restarts() + 1}, SystemExit(-1)


def requeue_signal_delay(timeout_min: int) -> int:
    """``signal_delay_s`` for a job limit of ``timeout_min``: an eighth of it, from 60 to 120 s.
    slurmctld looks at time limits once a minute and signals a job from 30 s before ``signal_delay_s``
    on, so the signal comes up to 30 s before or after that moment: 60 s keeps it ahead of the
    limit. Requeueing takes a second; what the job trained since its last epoch is trained again."""
    return max(60, min(120, int(timeout_min) * 60 // 8))


held_signals: list[int] = []


def time_limit_signal() -> int:
    """The signal submitit asks Slurm to send before a job's time limit (USR2 unless configured)."""
    return getattr(signal, f"SIG{submitit_slurm.SlurmJobEnvironment.USR_SIG}")


def _hold_early_signal() -> None:
    """In a job that submitit starts on Slurm this module is imported while the job's pickle is read,
    before submitit installs its signal handlers: until then Slurm's time-limit signal (its default
    action ends the process) is held, for ``handle_time_limit_signal_here`` to deliver."""
    if (
        os.environ.get("SUBMITIT_EXECUTOR") != "slurm"
        or threading.current_thread() is not threading.main_thread()
    ):
        return
    if signal.getsignal(time_limit_signal()) == signal.SIG_DFL:
        signal.signal(time_limit_signal(), lambda signum, frame: held_signals.append(signum))


_hold_early_signal()


def lightning_plugins() -> list:
    """In a job of this launcher, Lightning's Slurm environment without its auto-requeue (see the
    module's docstring); elsewhere (a run in your own sbatch script, say) Lightning's default."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    submitit_job = os.environ.get("SUBMITIT_EXECUTOR") == "slurm"
    return [SLURMEnvironment(auto_requeue=False)] if submitit_job and SLURMEnvironment.detect() else []
