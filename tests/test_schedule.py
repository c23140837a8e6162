"""Learning-rate schedules (``sam3lora.training.schedule``): warm-up, then cosine / linear / constant decay."""

from __future__ import annotations

import math

import pytest
import torch

from sam3lora.training.schedule import SCHEDULES, ScheduleSettings

TOTAL = 50
WARMUP = 10


def curve(name: str, warmup: int = WARMUP, min_lr_ratio: float = 0.0, total: int = TOTAL) -> list[float]:
    """Multiplier of the peak learning rate at optimiser steps 0..total (one past the last step)."""
    f = ScheduleSettings(name=name, warmup_steps=warmup, min_lr_ratio=min_lr_ratio).factor(total)
    return [f(s) for s in range(total + 1)]


@pytest.mark.parametrize("name", SCHEDULES)
def test_warmup_rises_linearly_from_above_zero_to_the_peak(name: str) -> None:
    values = curve(name)
    warm = values[: WARMUP + 1]
    assert warm[0] > 0  # the very first step already moves the weights
    steps = [b - a for a, b in zip(warm, warm[1:], strict=False)]
    assert all(d > 0 for d in steps)
    assert max(steps) - min(steps) < 1e-9  # a straight line
    assert values[WARMUP] == pytest.approx(1.0)  # the peak is reached right after the warm-up
    assert max(values) == pytest.approx(1.0)


def test_cosine_follows_half_a_cosine_to_min_lr_ratio() -> None:
    ratio = 0.1
    values = curve("cosine", min_lr_ratio=ratio)
    decay = TOTAL - WARMUP
    for s in range(WARMUP, TOTAL + 1):
        progress = (s - WARMUP) / decay
        expected = ratio + (1 - ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        assert values[s] == pytest.approx(expected, abs=1e-12)
    assert values[WARMUP + decay // 2] == pytest.approx(ratio + (1 - ratio) / 2)  # half way down at mid-decay
    assert values[TOTAL] == pytest.approx(ratio)
    tail = values[WARMUP:]
    assert all(b <= a for a, b in zip(tail, tail[1:], strict=False))


def test_linear_decays_in_equal_steps_to_min_lr_ratio() -> None:
    ratio = 0.2
    values = curve("linear", min_lr_ratio=ratio)
    tail = values[WARMUP:]
    deltas = [b - a for a, b in zip(tail, tail[1:], strict=False)]
    assert all(d == pytest.approx(-(1 - ratio) / (TOTAL - WARMUP)) for d in deltas)
    assert values[TOTAL] == pytest.approx(ratio)


def test_constant_stays_at_the_peak_after_warmup_and_ignores_min_lr_ratio() -> None:
    values = curve("constant", min_lr_ratio=0.3)
    assert values[WARMUP:] == [1.0] * (TOTAL - WARMUP + 1)


@pytest.mark.parametrize("name", ["cosine", "linear"])
def test_min_lr_ratio_is_the_floor_and_holds_past_the_end(name: str) -> None:
    ratio = 0.05
    f = ScheduleSettings(name=name, warmup_steps=0, min_lr_ratio=ratio).factor(TOTAL)
    assert f(0) == pytest.approx(1.0)
    assert min(f(s) for s in range(TOTAL + 1)) == pytest.approx(ratio)
    assert f(TOTAL + 7) == pytest.approx(ratio)  # steps past the estimate (e.g. a resumed run) stay at the floor
    zero = ScheduleSettings(name=name, warmup_steps=0, min_lr_ratio=0.0).factor(TOTAL)
    assert zero(TOTAL) == pytest.approx(0.0)


def test_warmup_longer_than_training_still_reaches_the_peak() -> None:
    values = curve("cosine", warmup=1000, total=8)
    assert values[0] > 0
    assert values[7] == pytest.approx(1.0)  # the last step of 8 runs at the peak instead of never reaching it
    assert max(values) <= 1.0 + 1e-12


def test_lambdalr_steps_the_optimiser_along_the_curve() -> None:
    """What configure_optimizers does: LambdaLR stepped once per optimiser step, peak = the optimiser's lr."""
    peak, total = 3e-4, 12
    settings = ScheduleSettings(name="cosine", warmup_steps=3, min_lr_ratio=0.1)
    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([param], lr=peak)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, settings.factor(total))
    seen = []
    for _ in range(total):
        seen.append(optimizer.param_groups[0]["lr"])
        param.grad = torch.ones(2)
        optimizer.step()
        scheduler.step()
    f = settings.factor(total)
    assert seen == pytest.approx([peak * f(s) for s in range(total)])
    assert max(seen) == pytest.approx(peak)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"name": "bogus"}, "module.scheduler.name"),
        ({"name": "Cosine"}, "module.scheduler.name"),
        ({"warmup_steps": -1}, "module.scheduler.warmup_steps"),
        ({"min_lr_ratio": 1.5}, "module.scheduler.min_lr_ratio"),
        ({"min_lr_ratio": -0.1}, "module.scheduler.min_lr_ratio"),
    ],
)
def test_bad_settings_are_errors_naming_the_key(kwargs: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key.replace(".", r"\.")) as info:
        ScheduleSettings(**kwargs)
    if "name" in kwargs:  # the message lists the valid choices
        assert all(name in str(info.value) for name in SCHEDULES)
