"""Out-of-fold (OOF) probabilities: each labelled image predicted by the model that did not train on
it, so thresholds tuned on them rest on every labelled image instead of one val split.

Pure tensor maths on the ``val_predictions`` that every checkpoint carries (stems, probabilities,
targets of its val images); shared by ``make cv`` and the ensembles of ``make submit``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from coco_multilabel.classes import COCO_CLASSES
from coco_multilabel.decisions.thresholds import decide, evaluate_thresholds, rule_of
from coco_multilabel.errors import UserError
from coco_multilabel.metrics import per_class_table


@dataclass
class HeldOut:
    """One model's val predictions, and the fold it held out (its val images)."""

    fold: int
    stems: list[str]
    probs: torch.Tensor
    targets: torch.Tensor
    source: str = "model"


def out_of_fold(members: list[HeldOut]) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """``(stems, probs, targets)`` over every image some member held out, sorted by stem. Members
    holding out the same fold (the folds of several cross-validations) are averaged; different
    folds must hold different images."""
    by_fold: dict[int, list[HeldOut]] = {}
    for member in members:
        by_fold.setdefault(member.fold, []).append(member)
    rows: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for fold, group in sorted(by_fold.items()):
        first = group[0]
        for other in group[1:]:
            if other.stems != first.stems:
                raise UserError(
                    f"{other.source} and {first.source} both hold out fold {fold} but not the same "
                    "images: they come from different folds files"
                )
        probs = torch.stack([m.probs.float() for m in group]).mean(0)
        for stem, p, t in zip(first.stems, probs, first.targets, strict=True):
            if stem in rows:
                raise UserError(
                    f"image {stem} is held out by two folds (fold {fold}, {first.source}): these "
                    "models were not trained on the folds of one cross-validation"
                )
            rows[stem] = (p, t)
    stems = sorted(rows)
    if not stems:
        raise UserError("no out-of-fold predictions: the models hold none")
    return stems, torch.stack([rows[s][0] for s in stems]), torch.stack([rows[s][1] for s in stems])


def oof_scores(
    probs: torch.Tensor, targets: torch.Tensor, tuning: dict, seed: int = 0, rare: int = 10
) -> dict:
    """The metric suite on the OOF probabilities, thresholds tuned on them (global and per class),
    each cross-fitted, and the per-class F1 of the ``rare`` classes with the fewest images, all of
    the decision rule the fold models were tuned for (``min_labels``), the one submit applies.

    ``tuning``: a checkpoint's ``threshold_tuning`` record (objective, mode, per-class options, rule).
    """
    objective, min_labels = tuning.get("objective", "macro_f1"), rule_of(tuning)
    per_class_kwargs = {k: tuning[k] for k in ("min_positives", "shrinkage") if k in tuning}
    results = {}
    for mode in ("global", "per_class"):
        metrics = evaluate_thresholds(
            probs, targets, mode, objective, seed, min_labels=min_labels, **per_class_kwargs
        )
        chosen = metrics.pop("tuning")
        results[mode] = {
            "metrics": metrics,
            "thresholds": [round(float(t), 4) for t in chosen.thresholds],
            "global_threshold": chosen.global_threshold,
        }
    mode = tuning.get("mode", "global")
    thresholds = torch.tensor(results[mode]["thresholds"])
    decisions = decide(probs, thresholds, min_labels)
    table = per_class_table(decisions, targets, COCO_CLASSES[: probs.shape[1]], probs, thresholds)
    rarest = sorted((r for r in table if r["support"] > 0), key=lambda r: (r["support"], r["class"]))[:rare]
    return {
        "images": len(probs),
        "objective": objective,
        "mode": mode,
        "min_labels": min_labels,
        "score_xfit": results[mode]["metrics"][f"{objective}_xfit"],
        "thresholds": results[mode]["thresholds"],
        "global_threshold": results[mode]["global_threshold"],
        "by_mode": results,
        "rarest_classes": rarest,
        "tuning": {**tuning, "mode": mode, "thresholds": results[mode]["thresholds"],
                   "global_threshold": results[mode]["global_threshold"], "min_labels": min_labels,
                   "tuned_on": "out-of-fold", "images": len(probs),
                   "support": [int(s) for s in targets.sum(0)],
                   "score_tuned": results[mode]["metrics"][f"{objective}_tuned"],
                   "score_xfit": results[mode]["metrics"][f"{objective}_xfit"]},
    }  # fmt: skip
