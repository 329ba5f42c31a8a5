"""Classification heads over a backbone's features."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ClassSpecificResidualAttention(nn.Module):
    """CSRA (Zhu & Wu, ICCV 2021): each class's logit is its mean score over the feature map plus
    ``lam`` times its highest score there, so a small object, which the global average dilutes,
    still counts. It has the parameters of a linear head; the scores come from the same weights.

    Why it is in the default recipe: small objects are most of COCO's labels, and the max term
    helps most on large maps (384 px); at 224 px (7 x 7 maps) it did nothing (``make ablation``).
    """

    def __init__(self, in_features: int, num_classes: int, dropout: float = 0.2, lam: float = 0.3):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(in_features, num_classes)
        self.lam = lam

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        """Logits (N x classes) of feature maps (N x C x h x w)."""
        if maps.dim() != 4:
            raise ValueError(f"CSRA needs feature maps (N x C x h x w), got shape {tuple(maps.shape)}")
        weight = self.classifier.weight[:, :, None, None]
        scores = F.conv2d(self.dropout(maps), weight).flatten(2)  # N x classes x positions
        return scores.mean(2) + self.lam * scores.amax(2) + self.classifier.bias
