"""Decisions: the leaderboard scores hard 0/1 labels, so the rule that makes them matters.

The rule (:func:`decide`), the one ``make submit`` writes: every class above its threshold, and at
least each image's ``min_labels`` most likely classes. Thresholds are tuned for that rule, and every
tuned, cross-fitted and out-of-fold figure scores it, so a figure is the figure of what submit does.
``min_labels`` is stored with the thresholds (the ``threshold_tuning`` record of a checkpoint).

Pure tensor maths, shared by the ThresholdTuner callback, evaluate, the report and the figures.

Tuning on val and scoring on the same val is optimistic, more so per class and on small sets;
``cross_fit`` gives the honest figure: tune on one half, score on the other, both ways, averaged.
The halves are stratified like the folds (``data/folds.py``), so a rare class has positives in both.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from coco_multilabel.data.folds import stratified_folds
from coco_multilabel.metrics import (
    OBJECTIVES,
    class_counts,
    label_scores,
    mean_average_precision,
    score_tensors,
)

GRID = torch.linspace(0.02, 0.98, 97)


def decide(probs: torch.Tensor, thresholds, min_labels: int = 0) -> torch.Tensor:
    """N x C 0/1 decisions: ``probs > thresholds``, and each row's ``min_labels`` most likely classes."""
    chosen = probs > thresholds
    if min_labels > 0:
        chosen.scatter_(1, probs.topk(min(min_labels, probs.shape[1]), dim=1).indices, True)
    return chosen


def rule_of(tuning: dict | None) -> int:
    """The ``min_labels`` a ``threshold_tuning`` record was tuned for: 0 (thresholds alone) for records
    written before the rule was stored in them, as they were tuned then."""
    return int((tuning or {}).get("min_labels", 0))


def rule_words(min_labels: int) -> str:
    return "no minimum of labels" if min_labels == 0 else f"at least {min_labels} label(s) an image"


def describe(tuning: dict | None) -> str:
    """What a ``threshold_tuning`` record's figure is, in words: the rule, the score of that rule
    and the images it was measured on, said as they are (never "held out" where they chose the model)."""
    if not tuning:
        return "untuned: above 0.5 for every class, no minimum of labels"
    rule = f"above {tuning.get('mode', 'global')} thresholds, {rule_words(rule_of(tuning))}"
    objective = tuning.get("objective", "macro_f1")
    images = f"{tuning['images']} " if "images" in tuning else ""
    where = {
        "out-of-fold": f"on {images}out-of-fold images (each from the fold model that held it out; "
        "the folds' best epochs were chosen on them)",
        "selecting val": f"on the {images}val images that selected the members (their best epochs, "
        "and a sweep's TOP=n): not held out; make cv gives an honest figure",
        "out-of-fold, for a refit": f"of the fold models on {images}out-of-fold images; this model "
        "trained on all of them and has no figure of its own",
    }.get(tuning.get("tuned_on"), f"on {images}val images (the best epoch was chosen on them)")
    if "score_xfit" in tuning:
        figure = f"{objective} {tuning['score_xfit']:.4f} cross-fitted"
    elif "score_tuned" in tuning:
        figure = f"{objective} {tuning['score_tuned']:.4f} tuned"
    else:
        figure = objective
    return f"{rule}; {figure} {where}"


def count_table(
    probs: torch.Tensor, targets: torch.Tensor, grid: torch.Tensor = GRID, min_labels: int = 0
) -> torch.Tensor:
    """T x C x 3 counts (TP, FP, FN) of :func:`decide` at every threshold t of ``grid``."""
    positive = targets.bool()
    grid = grid.to(probs.dtype)
    tp = above(torch.where(positive, probs, -torch.inf), grid)  # T x C
    fp = above(torch.where(positive, -torch.inf, probs), grid)
    table = torch.stack([tp, fp, positive.sum(0) - tp], -1).double()
    if min_labels > 0:
        table += forced_counts(probs, positive, grid, min_labels)
    return table


def above(values: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """T x C: how many of each column of the N x C ``values`` are above each threshold of ``grid``:
    one sort and a binary search per column instead of T comparisons of the whole matrix."""
    ordered = values.T.contiguous().sort(dim=1).values  # C x N
    first_above = torch.searchsorted(ordered, grid.expand(len(ordered), -1).contiguous(), right=True)
    return (values.shape[0] - first_above).T


def forced_counts(probs: torch.Tensor, positive: torch.Tensor, grid: torch.Tensor, min_labels: int):
    """What forcing each row's ``min_labels`` most likely classes adds to the T x C x 3 counts: a
    forced class changes them only at the thresholds it is not above (one TP more and one FN less
    for a positive, one FP more for a negative), so only the N x ``min_labels`` forced cells are
    looked at, not the whole N x C matrix again."""
    top = probs.topk(min(min_labels, probs.shape[1]), dim=1)
    p, classes = top.values.flatten(), top.indices.flatten()
    hit = positive.gather(1, top.indices).flatten().double()
    change = torch.stack([hit, 1 - hit, -hit], -1)  # M x 3
    below = (p.unsqueeze(0) <= grid.unsqueeze(1)).double()  # T x M: not above the threshold
    out = torch.zeros(len(grid), probs.shape[1], 3, dtype=torch.double)
    out.index_add_(1, classes, below.unsqueeze(-1) * change.unsqueeze(0))
    return out


def objective_of(counts: torch.Tensor, objective: str) -> torch.Tensor:
    """``objective`` from (..., C, 3) counts, over any leading batch dimensions."""
    if objective not in OBJECTIVES:
        raise ValueError(f"thresholds.objective must be one of {OBJECTIVES}, got {objective!r}")
    return score_tensors(counts)[objective]


def score_at(
    probs: torch.Tensor, targets: torch.Tensor, thresholds, objective: str, min_labels: int = 0
) -> float:
    return float(objective_of(class_counts(decide(probs, thresholds, min_labels), targets), objective))


@dataclass
class Tuning:
    thresholds: torch.Tensor  # C values
    global_threshold: float
    score: float  # the objective on the data it was tuned on


def tune_global(
    probs, targets, objective: str = "macro_f1", grid: torch.Tensor = GRID, min_labels: int = 0
) -> Tuning:
    """The single threshold of ``grid`` that maximises ``objective`` (the lowest on ties)."""
    scores = objective_of(count_table(probs, targets, grid, min_labels), objective)
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
    min_labels: int = 0,
) -> Tuning:
    """One threshold per class, shrunk toward the global one.

    A class with fewer than ``min_positives`` positives keeps the global threshold; the others get
    ``(n t_c + k t_global) / (n + k)`` with n its positives and k = ``shrinkage``, so a class seen
    a few times cannot pick an extreme value. Macro F1 splits into one problem per class; for
    micro F1 and CF1 each class is improved in turn with the others held (two passes). The classes
    ``min_labels`` forces do not depend on the thresholds, so a class's counts still depend on its
    own threshold alone.
    """
    glob = tune_global(probs, targets, objective, grid, min_labels)
    table = count_table(probs, targets, grid, min_labels)  # T x C x 3
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
    score = score_at(probs, targets, thresholds, objective, min_labels)
    return Tuning(thresholds, glob.global_threshold, score)


def tune(
    probs, targets, mode: str = "global", objective: str = "macro_f1", min_labels: int = 0, **kwargs
) -> Tuning:
    if mode == "global":
        return tune_global(probs, targets, objective, min_labels=min_labels)
    if mode == "per_class":
        return tune_per_class(probs, targets, objective, min_labels=min_labels, **kwargs)
    raise ValueError(f"thresholds.mode must be 'global' or 'per_class', got {mode!r}")


def halves(targets: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two halves of the rows, stratified as the folds are (iterative stratification): every class
    with two or more positives has positives in both, so neither half tunes or scores without it."""
    if len(targets) < 2:
        return torch.arange(0), torch.arange(len(targets))
    side = torch.from_numpy(stratified_folds(targets.cpu().numpy() > 0, 2, seed, warn=False))
    return torch.nonzero(side == 0).flatten(), torch.nonzero(side == 1).flatten()


def cross_fit(
    probs: torch.Tensor,
    targets: torch.Tensor,
    tune_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    score_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], float],
    seed: int = 0,
) -> float:
    """Tune on one half and score on the other, then the reverse; the mean of the two. The halves
    are stratified (:func:`halves`).

    ``tune_fn(probs, targets)`` returns thresholds, ``score_fn(probs, targets, thresholds)`` a score;
    no sample is ever used to tune and to score the same thresholds.
    """
    parts = halves(targets, seed)
    scores = []
    for fit, held_out in (parts, parts[::-1]):
        thresholds = tune_fn(probs[fit], targets[fit])
        scores.append(score_fn(probs[held_out], targets[held_out], thresholds))
    return sum(scores) / 2


def evaluate_thresholds(
    probs: torch.Tensor,
    targets: torch.Tensor,
    mode: str,
    objective: str,
    seed: int = 0,
    *,
    min_labels: int,
    **per_class_kwargs,
) -> dict:
    """Scores of the decision rule at 0.5, tuned and cross-fitted, plus the ``tuning`` itself (used by
    the callback and by ``evaluate`` on a saved probabilities file). ``min_labels`` is the rule's:
    no default, so that no caller scores another rule than the one submit applies."""
    at_half = label_scores(decide(probs, 0.5, min_labels), targets)
    tuning = tune(
        probs, targets, mode, objective, min_labels, **(per_class_kwargs if mode == "per_class" else {})
    )
    tuned = label_scores(decide(probs, tuning.thresholds, min_labels), targets)
    metrics = {**at_half, **{f"{k}_tuned": v for k, v in tuned.items()}}
    metrics["map"] = mean_average_precision(probs, targets)
    metrics["threshold"] = tuning.global_threshold
    modes = ("global", "per_class") if mode == "per_class" else ("global",)
    for m in modes:
        suffix = "" if m == mode else "_global"
        kwargs = per_class_kwargs if m == "per_class" else {}

        def tune_fn(p, t, m=m, kwargs=kwargs):
            return tune(p, t, m, objective, min_labels, **kwargs).thresholds

        def score_fn(p, t, thr):
            return score_at(p, t, thr, objective, min_labels)

        metrics[f"{objective}_xfit{suffix}"] = cross_fit(probs, targets, tune_fn, score_fn, seed)
        if suffix:
            metrics[f"{objective}_tuned{suffix}"] = tune(probs, targets, m, objective, min_labels).score
    metrics["tuning"] = tuning
    return metrics
