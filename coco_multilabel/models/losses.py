"""Multi-label losses besides plain BCE, chosen with the ``loss=`` config group.

COCO images hold a few of 80 classes, so almost every (image, class) pair is a negative: easy
negatives dominate the BCE gradient. Both losses here shift weight toward the positives.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class AsymmetricLoss(nn.Module):
    """Asymmetric Loss (Ridnik et al., ICCV 2021), summed over classes, averaged over images.

    Negatives are down-weighted by ``p ** gamma_neg`` after shifting their probability by ``clip``
    (very easy negatives then count zero); positives by ``(1 - p) ** gamma_pos``. With both gammas
    and ``clip`` at zero it is BCE summed over classes: ``BCEWithLogits * num_classes``.
    """

    def __init__(self, gamma_neg: float = 4.0, gamma_pos: float = 0.0, clip: float = 0.05, eps: float = 1e-8):
        super().__init__()
        self.gamma_neg, self.gamma_pos, self.clip, self.eps = gamma_neg, gamma_pos, clip, eps

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        p = torch.sigmoid(logits.float())
        p_neg = (p - self.clip).clamp(min=0) if self.clip > 0 else p
        log_pos = torch.log(p.clamp(min=self.eps))
        log_neg = torch.log((1 - p_neg).clamp(min=self.eps))
        if self.gamma_pos:
            log_pos = log_pos * (1 - p) ** self.gamma_pos
        if self.gamma_neg:
            log_neg = log_neg * p_neg**self.gamma_neg
        loss = targets * log_pos + (1 - targets) * log_neg
        return -loss.sum() / len(logits)


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
