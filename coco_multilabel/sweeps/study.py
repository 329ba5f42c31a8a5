"""An Optuna study over the train config (``make search``): the study is its journal.

The study lives in ``DIR/study.journal`` (Optuna's journal file storage, locked with a lock file that
works on a shared disk). Every worker, on this machine or another node, opens it, asks for a trial,
trains it and reports; nothing else coordinates them. A trial is one train run in ``DIR/<number>``,
as a sweep job is (its ``result.json``, split, checkpoints), or with ``search.folds=K`` one ``make
cv`` folder. A worker whose process is gone (killed, its node lost) leaves a running trial that the
next worker marks failed and retries once with the same params. The study ends when ``trials``
trials have finished; the same command again continues it and never trains a finished trial again.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
from hydra.errors import HydraException
from hydra.utils import instantiate
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.storages import JournalStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock
from optuna.trial import FrozenTrial, TrialState

from coco_multilabel.errors import UserError
from coco_multilabel.io import write_json_atomic
from coco_multilabel.sweeps.devices import acquire_device
from coco_multilabel.sweeps.job import read_result

log = logging.getLogger(__name__)

JOURNAL = "study.journal"
STUDY_NAME = "search"
HEARTBEAT = ".heartbeat"  # in a running trial's folder, touched by its worker
PRUNING_CALLBACK = "coco_multilabel.callbacks.study_pruning.StudyPruning"
SETTINGS = ("space", "args", "objective", "direction", "folds")  # what a study's trials share


@dataclass
class Search:
    """A study's settings: the first five are fixed when it is created, the rest may change between
    launches (``trials`` to extend a finished study)."""

    dir: Path
    space: dict[str, str]  # override key -> Hydra sweep expression: choice(...), interval(...), range(...)
    args: list[str]  # every trial's train overrides, data.root first
    objective: str  # the checkpoint monitor: what a trial scores
    direction: str  # maximize or minimize
    folds: int | None = None
    trials: int = 20
    sampler: dict = field(default_factory=lambda: {"_target_": "optuna.samplers.TPESampler", "seed": 0})
    pruner: dict = field(default_factory=lambda: {"_target_": "optuna.pruners.MedianPruner"})
    stale_after_s: float = 600.0

    def record(self) -> dict:
        """What the study keeps (its user attribute ``search``), so any process can run its trials."""
        return {k: v for k, v in asdict(self).items() if k != "dir"}


def is_study_dir(path: str | Path) -> bool:
    return (Path(path) / JOURNAL).is_file()


# --- the space ------------------------------------------------------------------------------------


def distributions(space: dict[str, str]) -> dict[str, BaseDistribution]:
    """Optuna's distributions of a space written in Hydra's sweep syntax, the one ``-m`` grids use:
    ``choice(a, b)`` one of the values, ``range(a, b, step)`` an integer (or a float) grid,
    ``interval(a, b)`` a float, ``int(interval(a, b))`` an integer, ``tag(log, ...)`` on a log scale."""
    parser = OverridesParser.create()
    result = {}
    for key, expression in space.items():
        where = f"search.params.{key}: {expression}"
        try:
            (override,) = parser.parse_overrides([f"{key}={expression}"])
        except HydraException as err:
            raise UserError(f"{where} is not Hydra sweep syntax ({err}); e.g. interval(0.0, 0.5)") from err
        value = override.value()
        log_scale = "log" in getattr(value, "tags", ())
        if isinstance(value, ChoiceSweep):
            if not all(isinstance(v, str | int | float | bool) for v in value.list):
                raise UserError(f"{where}: a choice's values must be numbers, strings or booleans")
            result[key] = CategoricalDistribution(value.list)
        elif isinstance(value, RangeSweep):
            values = [
                value.start + i * value.step
                for i in range(math.ceil((value.stop - value.start) / value.step))
            ]
            if not values:
                raise UserError(f"{where} holds no value")
            kind = IntDistribution if all(isinstance(v, int) for v in values) else FloatDistribution
            result[key] = kind(values[0], values[-1], step=value.step)
        elif isinstance(value, IntervalSweep):
            if not value.start < value.end:
                raise UserError(f"{where}: the interval must go from low to high")
            kind = (
                IntDistribution
                if isinstance(value.start, int) and isinstance(value.end, int)
                else FloatDistribution
            )
            result[key] = kind(value.start, value.end, log=log_scale)
        else:
            raise UserError(
                f"{where} is one value, not a range to search: give choice(...), range(...) or "
                "interval(...), or set the value for every trial in ARGS"
            )
    return result


def as_overrides(params: dict) -> list[str]:
    """A trial's params as train overrides: ``key=value``."""
    return [
        f"{key}={value!r}" if isinstance(value, float) else f"{key}={value}" for key, value in params.items()
    ]


def describe(params: dict) -> str:
    """A trial's params for people: floats to 4 significant digits (the overrides keep them whole)."""
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def extremes(space: dict[str, str]) -> list[list[str]]:
    """Overrides that together reach every end of the space (each choice, each interval's ends):
    composed and checked before the first trial, so that a bad key or value fails at once."""
    ends = []
    for key, dist in distributions(space).items():
        values = dist.choices if isinstance(dist, CategoricalDistribution) else (dist.low, dist.high)
        ends.append([as_overrides({key: v})[0] for v in values])
    width = max((len(e) for e in ends), default=0)
    return [[e[min(i, len(e) - 1)] for e in ends] for i in range(width)]


# --- the storage ----------------------------------------------------------------------------------


def storage(study_dir: Path) -> JournalStorage:
    journal = str(study_dir / JOURNAL)
    return JournalStorage(JournalFileBackend(journal, lock_obj=JournalFileOpenLock(journal)))


@contextlib.contextmanager
def study_lock(study_dir: Path) -> Iterator[None]:
    """Workers take turns to look at the study and ask for a trial, so that two never start the
    last trial, nor retry one killed trial twice (an ``O_EXCL`` lock file: NFS and Lustre too)."""
    lock = JournalFileOpenLock(str(study_dir / ".workers"))
    lock.acquire()
    try:
        yield
    finally:
        lock.release()


def open_study(study_dir: str | Path, create: Search | None = None) -> optuna.Study:
    """The study in ``study_dir``; with ``create``, made if missing, else refused when its trials
    were made with other settings (their scores would not compare)."""
    study_dir = Path(study_dir)
    if create is None:
        if not is_study_dir(study_dir):
            raise UserError(f"{study_dir} holds no study ({JOURNAL}); make search DIR={study_dir} starts one")
        return optuna.load_study(study_name=STUDY_NAME, storage=storage(study_dir))
    study_dir.mkdir(parents=True, exist_ok=True)
    with study_lock(study_dir):
        study = optuna.create_study(
            storage=storage(study_dir), study_name=STUDY_NAME, direction=create.direction, load_if_exists=True
        )
        if "search" not in study.user_attrs:
            study.set_user_attr("search", create.record())
    check_same_settings(study, create)
    return study


def check_same_settings(study: optuna.Study, search: Search) -> None:
    before = study.user_attrs["search"]
    differ = [key for key in SETTINGS if before.get(key) != search.record()[key]]
    if differ:
        was = "; ".join(f"{key}: {before.get(key)}" for key in differ)
        raise UserError(
            f"{search.dir} holds a study whose trials were made with another {', '.join(differ)} ({was}): "
            "run the same DATA, SPACE and ARGS again to continue it, or pass a new DIR"
        )


def settings(study: optuna.Study, study_dir: Path) -> Search:
    return Search(dir=study_dir, **study.user_attrs["search"])


def optuna_object(config: dict, kind: str, **kwargs):
    """A sampler or pruner from its config (``_target_``: a class of ``optuna.samplers`` or
    ``optuna.pruners``); also what a trial's process reads from the study, which it never lets
    name other code."""
    target = str(config.get("_target_", ""))
    if not target.startswith(f"optuna.{kind}."):
        example = "TPESampler" if kind == "samplers" else "MedianPruner"
        raise UserError(
            f"search.{kind[:-1]}._target_={target}: name a class of optuna.{kind}, e.g. {example}"
        )
    return instantiate({**config, **kwargs})


def open_trial(study_dir: str | Path, number: int) -> optuna.Trial:
    """Trial ``number`` of the study, in a trial's own process: it reports to the study's pruner."""
    study_dir = Path(study_dir)
    study = open_study(study_dir)
    study.pruner = optuna_object(settings(study, study_dir).pruner, "pruners")
    return optuna.Trial(
        study, study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number)
    )


def best_trials(study_dir: str | Path, top: int) -> list[Path]:
    """The folders of the ``top`` best complete trials (a run, or with ``folds`` a cv folder). They
    were chosen by the very val figures that scored them: selected on val, never held out."""
    study_dir = Path(study_dir)
    study = open_study(study_dir)
    search = settings(study, study_dir)
    done = sorted(
        study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)),
        key=lambda t: -t.value if search.direction == "maximize" else t.value,
    )
    if len(done) < top:
        raise UserError(f"{study_dir} has {len(done)} complete trials, fewer than TOP={top}")
    for t in done[:top]:
        log.info("trial %d of %s: %s = %.4f (selected on its val split among %d complete trials)",
                 t.number, study_dir, search.objective, t.value, len(done))  # fmt: skip
    return [study_dir / str(t.number) for t in done[:top]]


# --- the trials -----------------------------------------------------------------------------------


def retried(trials: list[FrozenTrial]) -> dict[int, int]:
    """Failed trial number -> the number of the trial that retries it."""
    return {
        t.system_attrs["retry_history"][-1]: t.number for t in trials if t.system_attrs.get("retry_history")
    }


def counted(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """The finished trials that count towards ``search.trials``: complete, pruned and failed, but not
    a killed trial that was retried (its retry counts instead)."""
    again = retried(trials)
    return [t for t in trials if t.state.is_finished() and t.number not in again]


def worker_alive(trial: FrozenTrial, stale_after_s: float, study_dir: Path) -> bool:
    """Whether a running trial's worker still runs: on this machine its process must exist; on any
    machine it touches the trial's heartbeat file (on the shared disk) often."""
    worker = trial.user_attrs.get("worker") or {}
    if worker.get("host") == socket.gethostname():
        try:
            os.kill(worker["pid"], 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
    beat = study_dir / str(trial.number) / HEARTBEAT
    last = beat.stat().st_mtime if beat.exists() else trial.datetime_start.timestamp()
    return time.time() - last < stale_after_s


def latest(study: optuna.Study, number: int) -> FrozenTrial:
    """Trial ``number`` as the journal has it now (its process may have written to it)."""
    return study.get_trials(deepcopy=False)[number]  # numbers count the study's trials from 0


def fail_and_retry(study: optuna.Study, trial: FrozenTrial, why: str) -> None:
    """Mark a trial whose worker stopped as failed and queue one retry with its params (Optuna's
    retry callback, which retries a trial once: a retry that is stopped again stays failed)."""
    study.tell(trial.number, state=TrialState.FAIL)
    log.warning("trial %d: %s; marked failed, retried once with the same params", trial.number, why)
    fresh = copy.deepcopy(trial)
    fresh.user_attrs = {}  # where the killed run ran is not the retry's
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # stable since Optuna 2.8
        RetryHeartbeatStaleTrialCallback(max_retry=1)(study, fresh)


def next_trial(study: optuna.Study, search: Search, worker: dict) -> optuna.Trial | None:
    """Under the study lock: fail the trials of stopped workers, then a trial to train (a retry
    first), or None when the trials that finished and run make ``search.trials``."""
    for trial in study.get_trials(states=(TrialState.RUNNING,)):
        if not worker_alive(trial, search.stale_after_s, search.dir):
            fail_and_retry(study, trial, "its worker stopped (killed, or its machine lost)")
    trials = study.get_trials(deepcopy=False)
    waiting = any(t.state == TrialState.WAITING for t in trials)
    running = sum(t.state == TrialState.RUNNING for t in trials)
    if not waiting and len(counted(trials)) + running >= search.trials:
        return None
    # trial n draws with seed + n (n: the number it gets; a retry keeps its params): a relaunched
    # worker starts its generator afresh and must not draw a finished trial's params again
    seed = search.sampler.get("seed")
    reseed = {"seed": seed + len(trials)} if seed is not None else {}
    study.sampler = optuna_object(search.sampler, "samplers", **reseed)
    trial = study.ask(distributions(search.space))
    trial.set_user_attr("worker", worker)
    return trial


@dataclass
class Devices:
    """Where a worker's trials train: a free device of the machine-wide pool (``device_pool``), or
    device ``worker`` of those SLURM gave this task (``lock_dir`` None); no ``keys``: the CPU."""

    keys: list[str]
    lock_dir: str | None
    poll_s: float = 1.0
    gpu: bool = False  # trials train on the GPU: each sees only its own (CUDA_VISIBLE_DEVICES)

    @contextlib.contextmanager
    def take(self, worker: int) -> Iterator[str | None]:
        if not self.keys:
            yield None
        elif self.lock_dir is None:
            yield self.keys[worker % len(self.keys)]
        else:
            with acquire_device(self.keys, self.lock_dir, self.poll_s) as index:
                yield self.keys[index]


def trial_command(search: Search, number: int, params: dict) -> list[str]:
    """The train command of trial ``number``: the study's ARGS, then the trial's params, in its
    folder; it reports each epoch to the study. With ``folds``, the ``make cv`` command instead."""
    folder = search.dir / str(number)
    overrides = [*search.args, *as_overrides(params)]
    if search.folds:
        data = next(o.partition("=")[2] for o in overrides if o.startswith("data.root="))
        rest = [o for o in overrides if not o.startswith("data.root=")]
        return [sys.executable, "-m", "coco_multilabel.cv", "--data", data, "--folds", str(search.folds),
                "--dir", str(folder), *rest]  # fmt: skip
    pruning = "+callbacks.study_pruning"
    return [sys.executable, "-m", "coco_multilabel.train", *overrides, f"hydra.run.dir={folder}",
            f"{pruning}._target_={PRUNING_CALLBACK}", f"{pruning}.study_dir={search.dir}",
            f"{pruning}.trial={number}"]  # fmt: skip


@contextlib.contextmanager
def heartbeat(path: Path, every_s: float) -> Iterator[None]:
    """Touch ``path`` every ``every_s`` seconds while the block runs: this worker is alive."""
    path.touch()
    done = threading.Event()

    def beat():
        while not done.wait(every_s):
            path.touch()

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        path.unlink(missing_ok=True)


def outcome(search: Search, folder: Path) -> dict:
    """What a finished trial's folder says: its score, epochs, checkpoint and error."""
    if search.folds:
        cv = folder / "cv.json"
        if not cv.is_file():
            return {"error": "no cv.json: the folds did not finish (see trial.log)"}
        record = json.loads(cv.read_text())
        epochs = [f.get("epochs") for f in record["folds"] if f.get("epochs") is not None]
        score = None if record.get("unfinished") else record.get("score_xfit")
        return {"value": score, "epochs": max(epochs, default=None), "checkpoint": str(folder)}
    result = read_result(folder) or {}
    return {"value": result.get("best_score") if result.get("status") == "done" else None,
            "epochs": result.get("epochs"), "checkpoint": result.get("best_checkpoint"),
            "error": result.get("error")}  # fmt: skip


def last_line(path: Path) -> str:
    """The last line a trial's process printed: its error, when it failed before writing result.json."""
    text = path.read_text(errors="replace") if path.is_file() else ""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


class Workers:
    """This machine's workers of a study: threads, each training one trial at a time in a process
    of its own on a device of its own. ``stop()`` (Ctrl-C, SIGTERM) ends their trials' processes;
    those trials are failed and retried when the study is launched again."""

    def __init__(self, search: Search, devices: Devices, on_trial_end=None):
        self.search, self.devices, self.on_trial_end = search, devices, on_trial_end
        self.stopping = threading.Event()
        self._processes: set[subprocess.Popen] = set()
        self._lock = threading.Lock()

    def run(self, index: int) -> None:
        """Worker ``index``: trials one after another until the study has its trials."""
        study = open_study(self.search.dir)
        worker = {"host": socket.gethostname(), "pid": os.getpid(), "worker": index}
        while not self.stopping.is_set():
            with contextlib.nullcontext() if self.search.folds else self.devices.take(index) as device:
                with study_lock(self.search.dir):
                    trial = next_trial(study, self.search, worker)
                if trial is None:
                    return
                self.run_trial(study, trial, device)
            if self.on_trial_end is not None:
                self.on_trial_end()

    def stop(self) -> None:
        self.stopping.set()
        with self._lock:
            for process in self._processes:
                process.terminate()

    def run_trial(self, study: optuna.Study, trial: optuna.Trial, device: str | None) -> TrialState:
        """Train ``trial`` in its folder, then tell the study how it ended."""
        search, folder = self.search, self.search.dir / str(trial.number)
        folder.mkdir(parents=True, exist_ok=True)
        trial.set_user_attr("device", device)
        env = dict(os.environ)
        if device is not None and self.devices.gpu:
            env["CUDA_VISIBLE_DEVICES"] = device
        where = f" on device {device}" if device is not None else ""
        log.info(
            "trial %d%s: %s (log: %s)", trial.number, where, describe(trial.params), folder / "trial.log"
        )
        start = time.perf_counter()
        beat = max(1.0, search.stale_after_s / 10)
        with heartbeat(folder / HEARTBEAT, beat), open(folder / "trial.log", "ab") as out:
            command = trial_command(search, trial.number, trial.params)
            with self._lock:  # stop() ends every process started before it, and no later one starts
                process = None
                if not self.stopping.is_set():
                    process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
                    self._processes.add(process)
            returncode = process.wait() if process else -15
            with self._lock:
                self._processes.discard(process)
        wall = round(time.perf_counter() - start, 1)
        result = outcome(search, folder)
        for key, value in (
            ("wall_s", wall),
            ("epochs", result.get("epochs")),
            ("checkpoint", result.get("checkpoint")),
        ):
            trial.set_user_attr(key, value)
        pruned_at = latest(study, trial.number).user_attrs.get("pruned_at_epoch")  # set by its process
        if returncode == 0 and pruned_at is not None:
            record = {**(read_result(folder) or {}), "status": "pruned", "pruned_at_epoch": pruned_at}
            write_json_atomic(folder / "result.json", record, indent=1)
            study.tell(trial, state=TrialState.PRUNED)
            log.info("trial %d pruned after epoch %s, in %.0f s", trial.number, pruned_at, wall)
            return TrialState.PRUNED
        if returncode == 0 and result.get("value") is not None:
            study.tell(trial, result["value"])
            log.info(
                "trial %d done in %.0f s: %s = %.4f", trial.number, wall, search.objective, result["value"]
            )
            return TrialState.COMPLETE
        if self.stopping.is_set():
            fail_and_retry(study, latest(study, trial.number), "stopped (Ctrl-C or SIGTERM)")
            return TrialState.FAIL
        if returncode < 0:
            error = f"killed by signal {-returncode}"
        else:
            error = result.get("error") or f"exit status {returncode}: {last_line(folder / 'trial.log')}"
        trial.set_user_attr("error", error)
        study.tell(trial, state=TrialState.FAIL)
        log.error("trial %d failed in %.0f s: %s (log: %s)", trial.number, wall, error, folder / "trial.log")
        return TrialState.FAIL
