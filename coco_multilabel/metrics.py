"""All metrics in one place, on torchmetrics.

Macro averages are means over all ``num_classes`` classes. A class with no positives and no
predictions in the evaluated set counts as F1 = precision = recall = 0 (torchmetrics'
``zero_division=0``), as does its average precision: on small sets, absent classes pull macro
figures down, which is why the val split should not be tiny.
"""

from __future__ import annotations

import torch
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MultilabelAveragePrecision,
    MultilabelF1Score,
    MultilabelPrecision,
    MultilabelRecall,
)
from torchmetrics.functional.classification import (
    multilabel_f1_score,
    multilabel_precision,
    multilabel_recall,
)


def metric_collection(num_classes: int, threshold: float = 0.5) -> MetricCollection:
    """Epoch metrics for training and validation, on probabilities at a fixed ``threshold``."""
    kwargs = dict(num_labels=num_classes, threshold=threshold)
    return MetricCollection(
        {
            "f1_macro": MultilabelF1Score(**kwargs, average="macro"),
            "precision_macro": MultilabelPrecision(**kwargs, average="macro"),
            "recall_macro": MultilabelRecall(**kwargs, average="macro"),
            "f1_micro": MultilabelF1Score(**kwargs, average="micro"),
            "map": MultilabelAveragePrecision(num_labels=num_classes, average="macro"),
        }
    )


def hard_scores(preds: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Leaderboard-style scores of 0/1 ``preds`` against 0/1 ``targets`` (both N x C):
    macro F1 / precision / recall (mean of per-class values) and micro F1 (pooled counts)."""
    preds, targets = preds.float(), targets.long()
    kwargs = dict(num_labels=targets.shape[1], threshold=0.5)
    return {
        "f1_macro": multilabel_f1_score(preds, targets, **kwargs, average="macro").item(),
        "precision_macro": multilabel_precision(preds, targets, **kwargs, average="macro").item(),
        "recall_macro": multilabel_recall(preds, targets, **kwargs, average="macro").item(),
        "f1_micro": multilabel_f1_score(preds, targets, **kwargs, average="micro").item(),
    }


def macro_f1_at(probs: torch.Tensor, targets: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Macro F1 of ``probs > t`` (torchmetrics' rule) for each ``t`` of a 1-D grid, one pass per t."""
    targets = targets.bool()
    scores = []
    for t in thresholds:
        preds = probs > t
        tp = (preds & targets).sum(0)
        fp = (preds & ~targets).sum(0)
        fn = (~preds & targets).sum(0)
        denom = 2 * tp + fp + fn
        f1 = torch.where(denom > 0, 2 * tp / denom.clamp(min=1), torch.zeros_like(denom, dtype=torch.float))
        scores.append(f1.float().mean())
    return torch.stack(scores)
