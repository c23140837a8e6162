"""Learning-rate schedules stepped every optimiser step: linear warm-up, then cosine, linear or constant."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

SCHEDULES = ("cosine", "linear", "constant")


@dataclass
class ScheduleSettings:
    """Attributes:
    name: ``cosine | linear | constant`` after the warm-up.
    warmup_steps: optimiser steps of linear warm-up from 0 to the peak learning rate.
    min_lr_ratio: final learning rate as a fraction of the peak (``cosine`` and ``linear``).
    """

    name: str = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.name not in SCHEDULES:
            raise ValueError(f"module.scheduler.name must be one of {SCHEDULES}, got {self.name!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"module.scheduler.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"module.scheduler.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")

    def factor(self, total_steps: int) -> Callable[[int], float]:
        """Multiplier of the peak learning rate at optimiser step ``s`` (for ``torch.optim.lr_scheduler.LambdaLR``)."""
        warmup = min(self.warmup_steps, max(total_steps - 1, 0))
        decay_steps = max(total_steps - warmup, 1)

        def f(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            if self.name == "constant":
                return 1.0
            progress = min((step - warmup) / decay_steps, 1.0)
            shape = 0.5 * (1 + math.cos(math.pi * progress)) if self.name == "cosine" else 1 - progress
            return self.min_lr_ratio + (1 - self.min_lr_ratio) * shape

        return f
