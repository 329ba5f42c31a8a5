"""Learning-rate schedules built from the number of optimizer steps, known only once training starts."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler


def warmup_cosine(
    optimizer: Optimizer, total_steps: int, warmup_fraction: float = 0.05, restart_at: int | None = None
) -> LRScheduler:
    """Linear warm-up over ``warmup_fraction`` of the steps, then cosine decay to zero.

    ``restart_at`` (a step) starts a second warm-up and decay there: the linear-probe-then-fine-tune
    schedule gives the fine-tuning phase its own cycle instead of the tail of the probe's.
    """
    starts = [0] + ([restart_at] if restart_at and 0 < restart_at < total_steps else [])
    ends = starts[1:] + [total_steps]

    def factor(step: int) -> float:
        start, end = max((s, e) for s, e in zip(starts, ends, strict=True) if s <= step)
        length = max(1, end - start)
        warmup, t = max(1, int(length * warmup_fraction)), step - start
        if t < warmup:
            return 0.01 + 0.99 * t / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (t - warmup) / max(1, length - warmup))))

    return LambdaLR(optimizer, factor)
