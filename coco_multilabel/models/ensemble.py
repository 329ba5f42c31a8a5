"""Ensembles: several checkpoints predict together, their probabilities averaged.

The members come from ``coco_multilabel/folders.py``, which knows what a user may name (checkpoint
files, a run, a ``make cv`` folder, a sweep's ``TOP=n``, a study) and how the members' figures are
measured (its ``split_kind``): each member is a checkpoint (``.path``, ``.checkpoint``) and its
probabilities on the images it did not train on (``.held_out()``). Each member predicts at its
own image size, resize mode and flip TTA. The ensemble's thresholds are tuned on images the
models that predict them did not train on:

- the folds of cross-validations (one or several sharing a folds file): the out-of-fold
  probabilities, each image from the members that held it out (``decisions/oof.py``): one fold
  model per image for one cross-validation, not the mean of all that the ensemble applies. No image
  is held out by every fold model. Averaging draws the probabilities together, but on held-out
  folds a threshold tuned on the ensemble's own held-out labels gained under 0.003 more over the
  out-of-fold one than it gained for one fold model alone (``bench/holdout_figures.py``,
  docs/results.md), so the out-of-fold thresholds are applied as they are;
- members trained on one split: the mean of their probabilities on that split's val images, the
  images that selected them (a sweep's ``TOP=n``), so their figure is not a held-out one.

Members trained on different splits have no such images in common; ``split_kind`` refuses them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L
import torch
from torch import nn

from coco_multilabel.data.transforms import checkpoint_eval_transform
from coco_multilabel.decisions.oof import oof_scores, out_of_fold
from coco_multilabel.decisions.thresholds import evaluate_thresholds, rule_of
from coco_multilabel.errors import UserError
from coco_multilabel.models.checkpoints import load_model
from coco_multilabel.models.classifier import MultiLabelClassifier
from coco_multilabel.models.inference import checkpoint_image_size, predict_files

log = logging.getLogger(__name__)


def ensemble_thresholds(members: list, kind: str, seed: int = 0) -> tuple[torch.Tensor, dict | None]:
    """The ensemble's thresholds and how they were chosen (a ``threshold_tuning`` record); ``kind``
    is how the members' figures are measured (``single``, ``folds`` or ``split``)."""
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


def held_out_probabilities(members: list, kind: str) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """``(stems, probs, targets)`` of the ensemble on the images none of its members trained on:
    out of fold for ``folds``, the mean of the members' val probabilities for models of one ``split``."""
    held = [m.held_out() for m in members]
    if kind == "folds":
        return out_of_fold(held)
    if any(h.stems != held[0].stems for h in held):
        raise UserError(
            f"{members[0].path} and the other members hold different val images; retrain them on one split"
        )
    return held[0].stems, torch.stack([h.probs.float() for h in held]).mean(0), held[0].targets


def ensemble_probabilities(
    members: list,
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
    members: list, models: list[MultiLabelClassifier], image_size: int | None = None
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


def trunk_input(member, model: MultiLabelClassifier, image_size: int | None) -> tuple:
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
