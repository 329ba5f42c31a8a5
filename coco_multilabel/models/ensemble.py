"""Ensembles: several checkpoints predict together, their probabilities averaged.

Members are named by checkpoint files, a cross-validation folder (``make cv``: its fold models), a
sweep folder (its ``top`` best jobs by the cross-fitted objective) or a study (``make search``: its
best trial, or its ``top`` best). Each member predicts at its
own image size, resize mode and flip TTA. The ensemble's thresholds are tuned on probabilities of
the same ensemble on images none of its members trained on:

- the folds of cross-validations (one or several sharing a folds file): the out-of-fold
  probabilities, each image from the members that held it out (``decisions/oof.py``);
- members trained on one split: the mean of their probabilities on that split's val images.

Members trained on different splits have no such images in common, and are refused.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from torch import nn

from coco_multilabel.data.folds import folds_digest, read_folds
from coco_multilabel.data.split import read_split
from coco_multilabel.data.transforms import checkpoint_eval_transform
from coco_multilabel.decisions.oof import HeldOut, oof_scores, out_of_fold
from coco_multilabel.decisions.thresholds import evaluate_thresholds, rule_of
from coco_multilabel.errors import UserError
from coco_multilabel.models.checkpoints import load_model, read_checkpoint
from coco_multilabel.models.classifier import MultiLabelClassifier
from coco_multilabel.models.inference import checkpoint_image_size, predict_files
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


def fold_jobs(cv_dir: Path) -> tuple[list, list[str]]:
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
    """``folds`` (folds of one partition), ``split`` (one train/val split), or a UserError."""
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


def ensemble_thresholds(members: list[Member], seed: int = 0) -> tuple[torch.Tensor, dict | None]:
    """The ensemble's thresholds and how they were chosen (a ``threshold_tuning`` record)."""
    kind = split_kind(members)
    first = members[0]
    tuning = first.checkpoint.get("threshold_tuning")
    if kind == "single" or tuning is None:
        return first.checkpoint["state_dict"]["thresholds"].float(), tuning
    _, probs, targets = held_out_probabilities(members, kind)
    if kind == "folds":
        record = oof_scores(probs, targets, tuning, seed)["tuning"]
        log.info("thresholds tuned on the out-of-fold probabilities of %d images", len(probs))
        return torch.tensor(record["thresholds"]), record
    objective, mode = tuning.get("objective", "macro_f1"), tuning.get("mode", "global")
    kwargs = {k: tuning[k] for k in ("min_positives", "shrinkage") if k in tuning and mode != "global"}
    metrics = evaluate_thresholds(probs, targets, mode, objective, seed, min_labels=rule_of(tuning), **kwargs)
    chosen = metrics.pop("tuning")
    log.info(
        "thresholds tuned on the ensemble's probabilities of the %d shared val images: the images that "
        "selected the members, not held out (make cv gives an honest figure)", len(probs),
    )  # fmt: skip
    record = {**tuning, "thresholds": [round(float(t), 4) for t in chosen.thresholds],
              "global_threshold": chosen.global_threshold, "score_tuned": metrics[f"{objective}_tuned"],
              "score_xfit": metrics[f"{objective}_xfit"], "images": len(probs),
              "tuned_on": "selecting val", "members": len(members)}  # fmt: skip
    return chosen.thresholds.float(), record


def held_out_probabilities(
    members: list[Member], kind: str | None = None
) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """``(stems, probs, targets)`` of the ensemble on the images none of its members trained on:
    out of fold for folds, the mean of the members' val probabilities for models of one split."""
    kind = kind or split_kind(members)
    held = [m.held_out() for m in members]
    if kind == "folds":
        return out_of_fold(held)
    if any(h.stems != held[0].stems for h in held):
        raise UserError(
            f"{members[0].path} and the other members hold different val images; retrain them on one split"
        )
    return held[0].stems, torch.stack([h.probs.float() for h in held]).mean(0), held[0].targets


def ensemble_probabilities(
    members: list[Member],
    paths: list[Path],
    image_size: int | None = None,
    tta: bool | None = None,
    **inference,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(probs, kept)`` as :func:`predict_files` returns them (rows of the readable images): the mean
    of the members' probabilities, each model at its own image size and resize mode (``image_size``
    overrides them all), with its own TTA unless ``tta`` is given. Members that share a frozen trunk
    (the folds of the default recipe) decode each image and run the trunk on it once for all."""
    models = [load_model(member.checkpoint, source=member.path) for member in members]
    for model in models:
        if tta is not None:
            model.hparams.tta = tta
    total, kept = None, None
    for group in shared_trunk_groups(members, models, image_size):
        names = ", ".join(str(members[i].path) for i in group)
        log.info("%d of %d members, %s: %s", len(group), len(members),
                 "one trunk" if len(group) > 1 else "alone", names)  # fmt: skip
        model = SharedTrunk([models[i] for i in group]) if len(group) > 1 else models[group[0]]
        probs, readable = predict_files(model, members[group[0]].checkpoint, paths, image_size=image_size,
                                        **inference)  # fmt: skip
        full = torch.zeros(len(paths), probs.shape[1])
        full[readable] = probs * (len(group) if len(group) > 1 else 1)  # SharedTrunk gives the group's mean
        total = full if total is None else total + full
        kept = readable if kept is None else kept & readable
    return (total / len(members))[kept], kept


class SharedTrunk(L.LightningModule):
    """Members with one frozen trunk: its features (and its mirror image's) computed once a batch,
    then each member's top and head on them, as validation runs them on the feature cache."""

    def __init__(self, models: list[MultiLabelClassifier]):
        super().__init__()
        self.members = nn.ModuleList(models)

    def trunk_batch(self, batch) -> dict:
        """The members' input: the batch's images through the shared trunk (their mirror images'
        too where a member averages them), as the feature cache serves val."""
        images, lead = batch["images"], self.members[0]
        features = {"features": lead.trunk_features(images)}
        if any(m.hparams.tta for m in self.members):
            features["mirror_features"] = lead.trunk_features(images.flip(-1))
        return features

    def predict_step(self, batch, batch_idx):
        features = self.trunk_batch(batch)
        return torch.stack([m.probabilities(features) for m in self.members]).mean(0)


def shared_trunk_groups(
    members: list[Member], models: list[MultiLabelClassifier], image_size: int | None = None
) -> list[list[int]]:
    """Indices of the members, grouped by trunk: the same input (size, resize mode), the same cut,
    normalisation and precision, and equal trunk weights. A fine-tuned trunk is its own group."""
    inputs = [trunk_input(m, model, image_size) for m, model in zip(members, models, strict=True)]
    groups: list[list[int]] = []
    for i, model in enumerate(models):
        same = (g for g in groups if inputs[g[0]] == inputs[i] and same_trunk(models[g[0]], model))
        if group := next(same, None):
            group.append(i)
        else:
            groups.append([i])
    return groups


def trunk_input(member: Member, model: MultiLabelClassifier, image_size: int | None) -> tuple:
    size = image_size or checkpoint_image_size(member.checkpoint)
    transform = repr(checkpoint_eval_transform(member.checkpoint, size))
    cut = json.dumps(model.trunk_cut(), sort_keys=True)
    return transform, cut, model.hparams.channels_last, type(model.backbone.model)


def same_trunk(a: MultiLabelClassifier, b: MultiLabelClassifier) -> bool:
    ta, tb = trunk_tensors(a), trunk_tensors(b)
    if len(ta) != len(tb):
        return False
    return all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(ta, tb, strict=True))


def trunk_tensors(model: MultiLabelClassifier) -> list[torch.Tensor]:
    """The backbone's weights and buffers below its top stages (all of them without a top)."""
    top = model.backbone.top_modules(model.hparams.top_stages)
    ids = {id(t) for module in top for t in (*module.parameters(), *module.buffers())}
    return [t for t in model.backbone.state_dict(keep_vars=True).values() if id(t) not in ids]


def check_same_folds_file(members: list[Member], folds_file: Path) -> None:
    """Members of a ``make cv`` folder hold out the folds of its folds.json."""
    digest = folds_digest(read_folds(folds_file))
    for m in members:
        if m.split is None or m.split.get("folds_digest") != digest:
            raise UserError(f"{m.path} was not trained on the folds of {folds_file}")
