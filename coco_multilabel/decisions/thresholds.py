"""Decision thresholds: the leaderboard scores hard 0/1 labels, so the cut-off matters.

Pure tensor maths, shared by the ThresholdTuner callback, evaluate, the report and the figures.

Tuning on val and scoring on the same val is optimistic, more so per class and on small sets;
``cross_fit`` gives the honest figure: tune on one half, score on the other, both ways, averaged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from coco_multilabel.metrics import (
    OBJECTIVES,
    class_counts,
    label_scores,
    mean_average_precision,
    score_tensors,
)

GRID = torch.linspace(0.02, 0.98, 97)


def count_table(probs: torch.Tensor, targets: torch.Tensor, grid: torch.Tensor = GRID) -> torch.Tensor:
    """T x C x 3 counts (TP, FP, FN) of ``probs > t`` for every threshold t of ``grid``."""
    positive = targets.bool()
    rows = []
    for t in grid:
        preds = probs > t
        rows.append(
            torch.stack(
                [(preds & positive).sum(0), (preds & ~positive).sum(0), (~preds & positive).sum(0)], -1
            )
        )
    return torch.stack(rows).double()


def objective_of(counts: torch.Tensor, objective: str) -> torch.Tensor:
    """``objective`` from (..., C, 3) counts, over any leading batch dimensions."""
    if objective not in OBJECTIVES:
        raise ValueError(f"thresholds.objective must be one of {OBJECTIVES}, got {objective!r}")
    return score_tensors(counts)[objective]


def score_at(probs: torch.Tensor, targets: torch.Tensor, thresholds: torch.Tensor, objective: str) -> float:
    return float(objective_of(class_counts(probs > thresholds, targets), objective))


@dataclass
class Tuning:
    thresholds: torch.Tensor  # C values
    global_threshold: float
    score: float  # the objective on the data it was tuned on


def tune_global(probs, targets, objective: str = "macro_f1", grid: torch.Tensor = GRID) -> Tuning:
    """The single threshold of ``grid`` that maximises ``objective`` (the lowest on ties)."""
    scores = objective_of(count_table(probs, targets, grid), objective)
    best = int(torch.argmax(scores))
    t = round(float(grid[best]), 4)
    return Tuning(torch.full((probs.shape[1],), t), t, float(scores[best]))


def tune_per_class(
    probs,
    targets,
    objective: str = "macro_f1",
    grid: torch.Tensor = GRID,
    min_positives: int = 5,
    shrinkage: float = 10.0,
) -> Tuning:
    """One threshold per class, shrunk toward the global one.

    A class with fewer than ``min_positives`` positives keeps the global threshold; the others get
    ``(n t_c + k t_global) / (n + k)`` with n its positives and k = ``shrinkage``, so a class seen
    a few times cannot pick an extreme value. Macro F1 splits into one problem per class; for
    micro F1 and CF1 each class is improved in turn with the others held (two passes).
    """
    glob = tune_global(probs, targets, objective, grid)
    table = count_table(probs, targets, grid)  # T x C x 3
    n_classes = probs.shape[1]
    start = int(torch.argmin((grid - glob.global_threshold).abs()))
    index = torch.full((n_classes,), start)
    if objective == "macro_f1":  # the mean of independent per-class F1s
        index = torch.argmax(objective_of(table.unsqueeze(-2), objective), dim=0)
    else:
        for _ in range(2):
            for c in range(n_classes):
                current = table[index, torch.arange(n_classes)]  # C x 3
                candidates = current.expand(len(grid), -1, -1).clone()
                candidates[:, c] = table[:, c]
                index[c] = int(torch.argmax(objective_of(candidates, objective)))
    raw = grid[index]
    support = targets.sum(0).double()
    shrunk = (support * raw + shrinkage * glob.global_threshold) / (support + shrinkage)
    thresholds = torch.where(
        support >= min_positives, shrunk, torch.tensor(glob.global_threshold, dtype=torch.double)
    )
    thresholds = thresholds.float()
    return Tuning(thresholds, glob.global_threshold, score_at(probs, targets, thresholds, objective))


def tune(probs, targets, mode: str = "global", objective: str = "macro_f1", **kwargs) -> Tuning:
    if mode == "global":
        return tune_global(probs, targets, objective)
    if mode == "per_class":
        return tune_per_class(probs, targets, objective, **kwargs)
    raise ValueError(f"thresholds.mode must be 'global' or 'per_class', got {mode!r}")


def cross_fit(
    probs: torch.Tensor,
    targets: torch.Tensor,
    tune_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    score_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], float],
    seed: int = 0,
) -> float:
    """Tune on one random half and score on the other, then the reverse; the mean of the two.

    ``tune_fn(probs, targets)`` returns thresholds, ``score_fn(probs, targets, thresholds)`` a score;
    no sample is ever used to tune and to score the same thresholds.
    """
    order = torch.randperm(len(probs), generator=torch.Generator().manual_seed(seed))
    halves = order[: len(order) // 2], order[len(order) // 2 :]
    scores = []
    for fit, held_out in (halves, halves[::-1]):
        thresholds = tune_fn(probs[fit], targets[fit])
        scores.append(score_fn(probs[held_out], targets[held_out], thresholds))
    return sum(scores) / 2


def evaluate_thresholds(
    probs: torch.Tensor, targets: torch.Tensor, mode: str, objective: str, seed: int = 0, **per_class_kwargs
) -> dict:
    """Scores at 0.5, tuned and cross-fitted, plus the ``tuning`` itself (used by the callback and
    by ``evaluate`` on a saved probabilities file)."""
    at_half = label_scores(probs > 0.5, targets)
    tuning = tune(probs, targets, mode, objective, **(per_class_kwargs if mode == "per_class" else {}))
    tuned = label_scores(probs > tuning.thresholds, targets)
    metrics = {**at_half, **{f"{k}_tuned": v for k, v in tuned.items()}}
    metrics["map"] = mean_average_precision(probs, targets)
    metrics["threshold"] = tuning.global_threshold
    modes = ("global", "per_class") if mode == "per_class" else ("global",)
    for m in modes:
        suffix = "" if m == mode else "_global"
        kwargs = per_class_kwargs if m == "per_class" else {}

        def tune_fn(p, t, m=m, kwargs=kwargs):
            return tune(p, t, m, objective, **kwargs).thresholds

        def score_fn(p, t, thr):
            return score_at(p, t, thr, objective)

        metrics[f"{objective}_xfit{suffix}"] = cross_fit(probs, targets, tune_fn, score_fn, seed)
        if suffix:
            metrics[f"{objective}_tuned{suffix}"] = tune(probs, targets, m, objective).score
    metrics["tuning"] = tuning
    return metrics
