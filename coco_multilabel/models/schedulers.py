"""Learning-rate schedules built from the number of optimizer steps, known only once training starts."""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, LRScheduler, SequentialLR


def warmup_cosine(optimizer: Optimizer, total_steps: int, warmup_fraction: float = 0.05) -> LRScheduler:
    """Linear warm-up from 1% over ``warmup_fraction`` of the steps, then cosine decay to zero (torch's
    own schedulers chained). Each phase of a schedule builds its own: a fine-tuning phase gets a
    cycle, not the tail of the probe's."""
    warmup = max(1, int(total_steps * warmup_fraction))
    return SequentialLR(
        optimizer,
        [LinearLR(optimizer, 0.01, 1.0, warmup), CosineAnnealingLR(optimizer, max(1, total_steps - warmup))],
        milestones=[warmup],
    )
