"""Every metric of the COCO multi-label literature, in one place, on torchmetrics' counts.

Notation: for class c, TP_c, FP_c, FN_c count hard predictions against labels; P_c = TP_c / (TP_c +
FP_c), R_c = TP_c / (TP_c + FN_c), F1_c = 2 TP_c / (2 TP_c + FP_c + FN_c), each 0 when its
denominator is 0 (torchmetrics' ``zero_division=0``). A prediction is ``prob > threshold``.

- macro_f1 / macro_precision / macro_recall: mean of F1_c, P_c, R_c over all C classes. A class with
  no labels and no predictions in the set scores 0 and still counts (as in torchmetrics), so on a
  small set absent classes pull these down; on the challenge's test set every class is present.
- micro_f1 / micro_precision / micro_recall (OF1, OP, OR): the same formulas on counts pooled over
  classes.
- cp, cr, cf1 (ML-GCN's CP, CR, CF1): cp = macro_precision, cr = macro_recall, cf1 = 2 cp cr /
  (cp + cr): the harmonic mean of the means, not the mean of the harmonic means.
- invfreq_f1 (the course notebook's F1): P and R averaged over classes with weights 1 / n_c, n_c
  the number of labelled images of class c in the set, then 2 P R / (P + R). Classes with n_c = 0
  get weight 0 (their weight would be infinite).
- map: mean over classes of average precision (torchmetrics, from probabilities). Classes with no
  positives in the set are left out: their AP is undefined.
"""

from __future__ import annotations

import warnings

import torch
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MultilabelAveragePrecision,
    MultilabelF1Score,
    MultilabelPrecision,
    MultilabelRecall,
)
from torchmetrics.functional.classification import multilabel_average_precision, multilabel_stat_scores

SCORE_NAMES = (
    "macro_f1", "macro_precision", "macro_recall", "micro_f1", "micro_precision", "micro_recall",
    "cf1", "cp", "cr", "invfreq_f1",
)  # fmt: skip
OBJECTIVES = ("macro_f1", "cf1", "micro_f1")

# Classes without positives are expected in a val set; map leaves them out (see above).
warnings.filterwarnings("ignore", message="No positive samples found in target")


class PresentClassesAP(MultilabelAveragePrecision):
    """Macro AP over the classes that have positives (torchmetrics would count the others as 0)."""

    def __init__(self, num_labels: int, **kwargs):
        super().__init__(num_labels=num_labels, average=None, **kwargs)

    def compute(self) -> torch.Tensor:
        per_class = super().compute()
        support = torch.cat(self.target).sum(0) if isinstance(self.target, list) else self.target.sum(0)
        return _present_mean(per_class, support)


def metric_collection(num_classes: int, threshold: float = 0.5) -> MetricCollection:
    """Epoch metrics on training batches, from probabilities at a fixed ``threshold``."""
    kwargs = dict(num_labels=num_classes, threshold=threshold)
    return MetricCollection(
        {
            "macro_f1": MultilabelF1Score(**kwargs, average="macro"),
            "macro_precision": MultilabelPrecision(**kwargs, average="macro"),
            "macro_recall": MultilabelRecall(**kwargs, average="macro"),
            "micro_f1": MultilabelF1Score(**kwargs, average="micro"),
            "map": PresentClassesAP(num_classes),
        }
    )


def class_counts(preds: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """C x 3 counts (TP, FP, FN) of 0/1 ``preds`` against 0/1 ``targets`` (both N x C)."""
    stats = multilabel_stat_scores(
        preds.long(), targets.long(), num_labels=targets.shape[1], average=None, validate_args=False
    )  # C x 5: tp, fp, tn, fn, support
    return stats.reshape(-1, 5)[:, [0, 1, 3]].double()  # one class comes back squeezed


def score_tensors(counts: torch.Tensor) -> dict[str, torch.Tensor]:
    """All hard-label scores (see the module docstring) from (..., C, 3) TP/FP/FN counts; any
    leading dimensions are kept, so threshold tuning scores many candidates at once."""
    tp, fp, fn = counts.double().unbind(-1)
    precision, recall = safe_divide(tp, tp + fp), safe_divide(tp, tp + fn)
    cp, cr = precision.mean(-1), recall.mean(-1)
    TP, FP, FN = tp.sum(-1), fp.sum(-1), fn.sum(-1)
    support = tp + fn
    weights = safe_divide(torch.ones_like(support), support)  # 1 / n_c, 0 for absent classes
    wp = safe_divide((weights * precision).sum(-1), weights.sum(-1))
    wr = safe_divide((weights * recall).sum(-1), weights.sum(-1))
    return {
        "macro_f1": safe_divide(2 * tp, 2 * tp + fp + fn).mean(-1),
        "macro_precision": cp,
        "macro_recall": cr,
        "micro_f1": safe_divide(2 * TP, 2 * TP + FP + FN),
        "micro_precision": safe_divide(TP, TP + FP),
        "micro_recall": safe_divide(TP, TP + FN),
        "cf1": safe_divide(2 * cp * cr, cp + cr),
        "cp": cp,
        "cr": cr,
        "invfreq_f1": safe_divide(2 * wp * wr, wp + wr),
    }


def scores_from_counts(counts: torch.Tensor) -> dict[str, float]:
    return {name: float(value) for name, value in score_tensors(counts).items()}


def label_scores(preds: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """All hard-label scores of 0/1 ``preds`` against ``targets`` (both N x C)."""
    return scores_from_counts(class_counts(preds, targets))


def paired_bootstrap(preds: list[torch.Tensor], targets: torch.Tensor, draws: int = 2000, seed: int = 0,
                     metric: str = "macro_f1") -> torch.Tensor:  # fmt: skip
    """``metric`` of each 0/1 prediction (N x C) on ``draws`` resamples of the N images, drawn with
    replacement, the same resamples for all: draws x len(preds). Differences between columns are
    paired, so two predictions of the same images are compared on the same luck."""
    n = targets.shape[0]
    picks = torch.randint(n, (draws, n), generator=torch.Generator().manual_seed(seed))
    weights = torch.zeros(draws, n, dtype=torch.float64).scatter_add_(
        1, picks, torch.ones(draws, n, dtype=torch.float64)
    )  # how often each image is drawn
    t = targets.bool()
    columns = []
    for p in map(torch.Tensor.bool, preds):
        per_image = torch.stack([p & t, p & ~t, ~p & t], -1).double()  # N x C x (TP, FP, FN)
        columns.append(score_tensors(torch.einsum("bn,nck->bck", weights, per_image))[metric])
    return torch.stack(columns, 1)


def average_precision(probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-class AP (NaN for classes without positives)."""
    ap = multilabel_average_precision(probs, targets.long(), num_labels=targets.shape[1], average=None)
    return torch.where(targets.sum(0) > 0, ap, torch.full_like(ap, float("nan")))


def mean_average_precision(probs: torch.Tensor, targets: torch.Tensor) -> float:
    return float(_present_mean(average_precision(probs, targets), targets.sum(0)))


def per_class_table(
    preds: torch.Tensor,
    targets: torch.Tensor,
    class_names: tuple[str, ...],
    probs: torch.Tensor | None = None,
    thresholds: torch.Tensor | None = None,
) -> list[dict]:
    """One row per class: name, support, P, R, F1, and AP / threshold when known."""
    tp, fp, fn = class_counts(preds, targets).unbind(-1)
    precision, recall = safe_divide(tp, tp + fp), safe_divide(tp, tp + fn)
    f1 = safe_divide(2 * tp, 2 * tp + fp + fn)
    ap = average_precision(probs, targets) if probs is not None else None
    rows = []
    for c, name in enumerate(class_names):
        row = {"class": c, "name": name, "support": int(tp[c] + fn[c]), "precision": float(precision[c]),
               "recall": float(recall[c]), "f1": float(f1[c])}  # fmt: skip
        if ap is not None:
            row["ap"] = float(ap[c])
        if thresholds is not None:
            row["threshold"] = float(thresholds[c])
        rows.append(row)
    return rows


def safe_divide(num, den) -> torch.Tensor:
    """``num / den`` where ``den > 0``, else 0 (torchmetrics' ``zero_division=0``)."""
    num, den = torch.as_tensor(num, dtype=torch.float64), torch.as_tensor(den, dtype=torch.float64)
    return torch.where(den > 0, num / den.clamp(min=1e-12), torch.zeros_like(num))


def _present_mean(per_class: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    present = support > 0
    return per_class[present].nanmean() if present.any() else torch.tensor(0.0)
