"""The nested measurement's threshold gains: picked on the images it is scored on, and cross-fitted."""

import torch

from coco_multilabel.bench.holdout_figures import threshold_gains


def separable(n: int = 400, classes: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Positives score in (0.5, 0.7), negatives in (0, 0.45): every threshold in [0.45, 0.5) is perfect."""
    g = torch.Generator().manual_seed(seed)
    targets = (torch.rand(n, classes, generator=g) < 0.3).float()
    targets[:2] = 1  # every class has positives in both halves
    probs = torch.where(targets > 0, 0.5 + 0.2 * torch.rand(n, classes, generator=g),
                        0.45 * torch.rand(n, classes, generator=g))  # fmt: skip
    return probs, targets


def test_a_threshold_far_from_the_best_loses_what_tuning_on_other_images_recovers():
    probs, targets = separable()
    gains = threshold_gains(probs, targets, 0.2, "macro_f1", min_labels=0, seeds=3)
    assert gains["in-sample"] > 0.1
    assert 0.1 < gains["cross-fitted"] <= gains["in-sample"] + 1e-9  # a half's threshold is never better
    assert 0.4 <= gains["median threshold"] < 0.5
    assert 0.44 <= gains["best threshold"] < 0.5


def test_the_best_threshold_gains_nothing_out_of_sample():
    probs, targets = separable(seed=1)
    gains = threshold_gains(probs, targets, 0.47, "macro_f1", min_labels=0, seeds=3)
    assert gains["in-sample"] == 0
    assert gains["cross-fitted"] <= 1e-9  # the halves' own thresholds can only lose to a perfect one


def test_picking_on_the_scored_images_gains_on_noise_and_the_cross_fitted_figure_does_not():
    g = torch.Generator().manual_seed(0)
    targets = (torch.rand(300, 8, generator=g) < 0.2).float()
    probs = torch.rand(300, 8, generator=g)  # knows nothing of the labels: predicting all is best
    gains = threshold_gains(probs, targets, 0.02, "macro_f1", min_labels=1, seeds=5)
    assert gains["in-sample"] > 0.003  # a threshold fitted to these images' luck
    assert gains["cross-fitted"] < 0  # which other images do not share
