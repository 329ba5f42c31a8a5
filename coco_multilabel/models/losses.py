"""Multi-label losses besides plain BCE, chosen with the ``loss=`` config group.

COCO images hold a few of 80 classes, so almost every (image, class) pair is a negative: easy
negatives dominate the BCE gradient. Both losses here shift weight toward the positives.
"""

from __future__ import annotations

import torch
from timm.loss import AsymmetricLossMultiLabel
from torch import nn
from torch.nn import functional as F


class AsymmetricLoss(AsymmetricLossMultiLabel):
    """Asymmetric Loss (Ridnik et al., ICCV 2021): timm's ``AsymmetricLossMultiLabel``, summed over
    classes and averaged over images, with the paper's COCO settings as defaults.

    Negatives are down-weighted by ``p ** gamma_neg`` after shifting their probability by ``clip``
    (very easy negatives then count zero); positives by ``(1 - p) ** gamma_pos``. ``loss=asl``
    names timm's class itself; this name stays so that checkpoints naming it still load (it was
    this project's own implementation, equal to timm's: tests/test_losses.py).
    """

    def __init__(self, gamma_neg: float = 4.0, gamma_pos: float = 0.0, clip: float = 0.05, eps: float = 1e-8):
        super().__init__(gamma_neg=gamma_neg, gamma_pos=gamma_pos, clip=clip, eps=eps, reduction="batchmean")


class PositiveWeightedBCE(nn.Module):
    """BCE whose positive terms of class c weigh ``((1 - f_c) / f_c) ** power``, with f_c the
    class's frequency in the training labels (``fit_class_frequencies``, called by the model when
    training starts). ``power=1`` balances each class's positives against its negatives; the
    square root (default) is milder, capped by ``max_weight`` for classes seen a handful of times.
    The weights are a buffer: a checkpoint keeps the ones it was trained with."""

    def __init__(self, num_classes: int = 80, power: float = 0.5, max_weight: float = 30.0):
        super().__init__()
        self.power, self.max_weight = power, max_weight
        self.register_buffer("pos_weight", torch.ones(num_classes))

    def fit_class_frequencies(self, targets: torch.Tensor) -> None:
        frequency = targets.float().mean(0).clamp(min=1.0 / max(1, len(targets)))
        weight = ((1 - frequency) / frequency).clamp(min=1.0) ** self.power
        self.pos_weight.copy_(weight.clamp(max=self.max_weight))

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits, targets, pos_weight=self.pos_weight)
