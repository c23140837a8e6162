"""Learning-rate schedules stepped every optimiser step: linear warm-up, then cosine, linear or constant.

Built from library schedulers: torch's ``LinearLR`` (warm-up, linear decay), ``ConstantLR`` (the floor after a
cosine) and transformers' ``get_cosine_with_min_lr_schedule_with_warmup`` (cosine to a fraction of each group's
peak), chained by ``SequentialLR``. The values live in ``conf/module/default.yaml`` (``module.scheduler``), the one
place they are stated: ``sam3lora.config.defaults("module/default.scheduler")`` builds the shipped one.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.optim import Optimizer
from torch.optim.lr_scheduler import ConstantLR, LinearLR, LRScheduler, SequentialLR
from transformers import get_cosine_with_min_lr_schedule_with_warmup

SCHEDULES = ("cosine", "linear", "constant")
HOLD_FOREVER = 2**62  # ConstantLR steps: more than any run takes


@dataclass
class ScheduleSettings:
    """Attributes:
    name: ``cosine | linear | constant`` after the warm-up.
    warmup_steps: optimiser steps of linear warm-up from ``1 / (warmup_steps + 1)`` of the peak to the peak.
    min_lr_ratio: final learning rate as a fraction of each parameter group's peak (``cosine`` and ``linear``);
        steps past the end (a resumed run beyond the estimate) stay there.
    """

    name: str
    warmup_steps: int
    min_lr_ratio: float

    def __post_init__(self) -> None:
        if self.name not in SCHEDULES:
            raise ValueError(f"module.scheduler.name must be one of {SCHEDULES}, got {self.name!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"module.scheduler.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"module.scheduler.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")

    def build(self, optimizer: Optimizer, total_steps: int) -> LRScheduler:
        """The scheduler over ``total_steps`` optimiser steps (step it once per optimiser step).

        The warm-up is shortened to ``total_steps - 1`` when longer, so the last step still runs at the peak.
        """
        warmup = min(self.warmup_steps, max(total_steps - 1, 0))
        decay = max(total_steps - warmup, 1)
        phases: list[LRScheduler] = []
        if warmup:
            phases.append(LinearLR(optimizer, start_factor=1 / (warmup + 1), end_factor=1.0, total_iters=warmup))
        if self.name == "cosine":
            phases.append(get_cosine_with_min_lr_schedule_with_warmup(optimizer, 0, decay,
                                                                      min_lr_rate=self.min_lr_ratio))
            # the cosine would rise again after `decay` steps: hold the floor for good instead
            phases.append(ConstantLR(optimizer, factor=self.min_lr_ratio, total_iters=HOLD_FOREVER))
        else:
            end = self.min_lr_ratio if self.name == "linear" else 1.0
            phases.append(LinearLR(optimizer, start_factor=1.0, end_factor=end, total_iters=decay))
        milestones = [warmup] if warmup else []
        if self.name == "cosine":
            milestones.append(warmup + decay)
        return SequentialLR(optimizer, phases, milestones) if milestones else phases[0]
