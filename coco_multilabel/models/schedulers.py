"""Learning-rate schedules built from the number of optimizer steps, known only once training starts."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler


def warmup_cosine(optimizer: Optimizer, total_steps: int, warmup_fraction: float = 0.05) -> LRScheduler:
    """Linear warm-up over ``warmup_fraction`` of the steps, then cosine decay to zero. Each phase
    of a schedule builds its own: a fine-tuning phase gets a cycle, not the tail of the probe's."""
    warmup = max(1, int(total_steps * warmup_fraction))

    def factor(step: int) -> float:
        if step < warmup:
            return 0.01 + 0.99 * step / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total_steps - warmup))))

    return LambdaLR(optimizer, factor)
