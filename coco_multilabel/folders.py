"""What a folder is: the models a user names to ``make submit``, ``predict`` and ``report``.

``CKPT=`` names one model or an ensemble's members, each a checkpoint:

- a checkpoint file, or several separated by commas;
- a run folder: its ``checkpoints/best.ckpt`` (``refit.ckpt`` in ``make cv``'s ``refit/``);
- a ``make cv`` folder (its ``folds.json``): every fold's best checkpoint, each fold done;
- a sweep folder with ``TOP=n``: its n best finished jobs by the sweep's objective;
- a study (``make search``): its best trial, or its ``TOP`` best, each a run or a cv folder.

What is known about how the members' figures were measured travels with them (:func:`split_kind`):
one model brings its own thresholds' record; the folds of cross-validations sharing a folds file are
scored out of fold, each image by the member that held it out; members of one split are scored on
the val images that chose them (their best epochs; a sweep's ``TOP=n``), not held out. Members of
different splits share no image none of them trained on, and are refused.

The science (``models/ensemble.py``) takes the members and that kind; only this module reads the
sweep machinery's files (``result.json``, ``summary.csv``, a study's storage) and a run's
``split.json``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from coco_multilabel.data.folds import folds_digest, read_folds
from coco_multilabel.data.split import read_split
from coco_multilabel.decisions.oof import HeldOut
from coco_multilabel.errors import UserError
from coco_multilabel.models.checkpoints import read_checkpoint
from coco_multilabel.sweeps.job import read_result
from coco_multilabel.sweeps.study import best_trials, is_study_dir
from coco_multilabel.sweeps.summary import collect

log = logging.getLogger(__name__)


@dataclass
class Member:
    path: Path
    checkpoint: dict
    split: dict | None  # the run's split.json, when the run folder is still there
    result: dict | None = None  # the run's result.json (make cv's table)

    @property
    def fold(self) -> int | None:
        return self.split.get("fold") if self.split else None

    def held_out(self) -> HeldOut:
        saved = self.checkpoint.get("val_predictions")
        if saved is None:
            raise UserError(
                f"{self.path} holds no val predictions (checkpoints written before this version, or a "
                "DDP run): retrain it, or submit it alone"
            )
        fold = self.fold if self.fold is not None else 0
        return HeldOut(fold, list(saved["stems"]), saved["probs"], saved["targets"], str(self.path))


def read_members(spec: str | list | tuple | Path, top: int | None = None) -> list[Member]:
    """The members named by ``spec`` (see :func:`member_paths`), each read with its run's split."""
    return [read_member(path) for path in member_paths(spec, top)]


def read_member(path: str | Path) -> Member:
    path = Path(path)
    checkpoint = read_checkpoint(path)
    split_file = path.parent.parent / "split.json"  # <run>/checkpoints/best.ckpt
    return Member(path, checkpoint, read_split(split_file) if split_file.is_file() else None)


def is_cv_dir(path: Path) -> bool:
    return path.is_dir() and (path / "folds.json").is_file()


def member_paths(spec: str | list | tuple | Path, top: int | None = None) -> list[Path]:
    """The checkpoints named by ``spec``: one file, files separated by commas (or a list), a run
    folder (its best checkpoint, or its refit one), a cross-validation folder (every fold's best
    checkpoint), a sweep folder (its ``top`` best jobs) or a search's study (its best trial, or
    its ``top`` best)."""
    if isinstance(spec, str):
        spec = [s.strip() for s in spec.strip("[]").split(",") if s.strip()]
    elif isinstance(spec, Path):
        spec = [spec]
    paths = []
    for item in map(Path, spec):
        if item.is_file() or not item.exists():
            paths.append(item)  # a missing file: read_checkpoint names it
        elif is_study_dir(item):  # make search: its best trial, or its top best; each a run or a cv folder
            paths += member_paths(best_trials(item, top or 1))
        elif is_cv_dir(item):
            paths += cv_checkpoints(item)
        elif (run := item / "checkpoints").is_dir():  # a run folder (make cv's refit/ among them)
            paths.append(run / "refit.ckpt" if (run / "refit.ckpt").is_file() else run / "best.ckpt")
        elif (item / "summary.csv").is_file() or any(read_result(d) for d in item.iterdir() if d.is_dir()):
            paths += sweep_checkpoints(item, top)
        else:
            raise UserError(
                f"{item} is a folder but neither a cross-validation (no folds.json) nor a sweep "
                "(no job folders with result.json); give a checkpoint file, e.g. <run>/checkpoints/best.ckpt"
            )
    if not paths:
        raise UserError("no checkpoint given: CKPT=<file>[,<file>...], a make cv folder or a sweep folder")
    return paths


def cv_checkpoints(cv_dir: Path) -> list[Path]:
    """The best checkpoint of every fold of a ``make cv`` folder; every fold must be done."""
    folds = read_folds(cv_dir / "folds.json")
    jobs = {}
    for job in sorted(p for p in cv_dir.iterdir() if p.is_dir() and p.name.isdigit()):
        result = read_result(job)
        if result and result.get("status") == "done" and result.get("best_checkpoint"):
            jobs[read_split(job / "split.json")["fold"]] = Path(result["best_checkpoint"])
    missing = sorted(set(range(folds["k"])) - set(jobs))
    if missing:
        raise UserError(
            f"{cv_dir}: folds {missing} of {folds['k']} are not done; run `make cv DIR={cv_dir}` "
            "(with the same DATA and ARGS) to finish them"
        )
    return [jobs[f] for f in sorted(jobs)]


def fold_jobs(cv_dir: Path) -> tuple[list[Member], list[str]]:
    """The finished folds' best checkpoints as ensemble members, and what the others are."""
    members, unfinished = [], []
    for job in sorted(
        (p for p in cv_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name)
    ):
        result = read_result(job)
        if result and result.get("status") == "done" and result.get("best_checkpoint"):
            members.append(read_member(result["best_checkpoint"]))
            members[-1].result = result
        else:
            unfinished.append(f"job {job.name}: {result.get('status') if result else 'not started'}")
    check_same_folds_file(members, cv_dir / "folds.json")
    return members, unfinished


def sweep_checkpoints(sweep_dir: Path, top: int | None) -> list[Path]:
    """The ``top`` best finished jobs of a sweep by its objective (cross-fitted by default)."""
    if not top:
        raise UserError(f"{sweep_dir} is a sweep folder: say how many of its best jobs to use with TOP=n")
    done = [r for r in collect(sweep_dir) if r["status"] == "done" and r.get("best_checkpoint")]
    if len(done) < top:
        raise UserError(f"{sweep_dir} has {len(done)} finished jobs, fewer than TOP={top}")
    for r in done[:top]:
        log.info("sweep job %s: %s = %.4f", r["job"], r.get("objective"), r["best_score"])
    return [Path(r["best_checkpoint"]) for r in done[:top]]


def split_kind(members: list[Member]) -> str:
    """How the members' figures are measured: ``single`` (one model, its own record), ``folds``
    (out of fold: folds of one partition), ``split`` (the val images of one train/val split, which
    selected them), or a UserError."""
    if len(members) == 1:
        return "single"
    names = ", ".join(str(m.path) for m in members)
    if refits := [str(m.path) for m in members if m.fold == -1]:
        raise UserError(
            f"{refits[0]} was trained on every labelled image (make cv REFIT=true): no image is held "
            "out of it to tune an ensemble's thresholds on; submit it alone"
        )
    if any(m.split is None for m in members):
        raise UserError(
            f"an ensemble needs each member's run folder (its split.json) to check that they share a "
            f"split: {names}"
        )
    if all(m.fold is not None for m in members):
        digests = {m.split.get("folds_digest") for m in members}
        if len(digests) == 1:
            return "folds"
    elif all(m.fold is None for m in members):
        parts = {(tuple(m.split["train"]), tuple(m.split["val"])) for m in members}
        if len(parts) == 1:
            return "split"
    raise UserError(
        f"these models were trained on different splits, so no val images are held out by all of "
        f"them to tune the ensemble's thresholds on: {names}. Ensemble models of one split (a sweep "
        "with one seed and data.val_fraction), or the folds of cross-validations with the same data, "
        "K and seed (make cv)"
    )


def check_same_folds_file(members: list[Member], folds_file: Path) -> None:
    """Members of a ``make cv`` folder hold out the folds of its folds.json."""
    digest = folds_digest(read_folds(folds_file))
    for m in members:
        if m.split is None or m.split.get("folds_digest") != digest:
            raise UserError(f"{m.path} was not trained on the folds of {folds_file}")
