"""Learning-rate schedules (``sam3lora.training.schedule``): warm-up, then cosine / linear / constant decay, read
off a real optimiser stepped by the built scheduler."""

from __future__ import annotations

import math

import pytest
import torch

from sam3lora.training.schedule import SCHEDULES, ScheduleSettings

TOTAL = 50
WARMUP = 10


def optimiser(peaks: tuple[float, ...] = (1.0,)) -> torch.optim.Optimizer:
    """AdamW over one parameter group per peak learning rate."""
    return torch.optim.AdamW([{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": lr} for lr in peaks])


def run(settings: ScheduleSettings, total: int, steps: int, peaks: tuple[float, ...] = (1.0,)) -> list[list[float]]:
    """Each group's learning rate at optimiser steps 0..steps-1 of a schedule built for ``total`` steps."""
    optimizer = optimiser(peaks)
    scheduler = settings.build(optimizer, total)
    seen = []
    for _ in range(steps):
        seen.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return seen


def curve(name: str, warmup: int = WARMUP, min_lr_ratio: float = 0.0, total: int = TOTAL, past: int = 0) -> list[float]:
    """Multiplier of the peak learning rate at optimiser steps 0..total (one past the last step) + ``past``."""
    settings = ScheduleSettings(name=name, warmup_steps=warmup, min_lr_ratio=min_lr_ratio)
    return [lrs[0] for lrs in run(settings, total, total + 1 + past)]


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
    values = curve(name, warmup=0, min_lr_ratio=ratio, past=7)
    assert values[0] == pytest.approx(1.0)
    assert min(values) == pytest.approx(ratio)
    assert values[TOTAL:] == pytest.approx([ratio] * 8)  # steps past the estimate (e.g. a resumed run) stay there
    assert curve(name, warmup=0, min_lr_ratio=0.0)[TOTAL] == pytest.approx(0.0)


def test_warmup_longer_than_training_still_reaches_the_peak() -> None:
    values = curve("cosine", warmup=1000, total=8)
    assert values[0] > 0
    assert values[7] == pytest.approx(1.0)  # the last step of 8 runs at the peak instead of never reaching it
    assert max(values) <= 1.0 + 1e-12


def test_each_group_follows_the_curve_from_its_own_peak() -> None:
    """What configure_optimizers does (per-component learning rates are parameter groups): every group runs the
    same multipliers of its own peak, floor included."""
    settings = ScheduleSettings(name="cosine", warmup_steps=3, min_lr_ratio=0.1)
    peaks, total = (3e-4, 1e-5), 12
    seen = run(settings, total, total + 3, peaks)
    factors = curve("cosine", warmup=3, min_lr_ratio=0.1, total=total, past=2)
    for g, peak in enumerate(peaks):
        assert [lrs[g] for lrs in seen] == pytest.approx([peak * f for f in factors], rel=1e-9)
    assert max(lrs[0] for lrs in seen) == pytest.approx(peaks[0])


@pytest.mark.parametrize("name", SCHEDULES)
def test_a_restored_scheduler_continues_exactly(name: str) -> None:
    """Resume: a scheduler loaded from another's state_dict (what a Lightning checkpoint holds) goes on as the
    uninterrupted one, across the warm-up/decay/floor boundaries."""
    settings = ScheduleSettings(name=name, warmup_steps=4, min_lr_ratio=0.2)
    total = 10
    whole = [lrs[0] for lrs in run(settings, total, total + 4)]
    for cut in (2, 6, 11):  # in the warm-up, the decay and past the end
        assert resumed(settings, total, cut, total + 4) == pytest.approx(whole[cut:], rel=1e-12)


def resumed(settings: ScheduleSettings, total: int, cut: int, steps: int) -> list[float]:
    """Learning rates at steps cut..steps-1 of a scheduler restored from the state of one stopped at ``cut``."""
    optimizer = optimiser()
    first = settings.build(optimizer, total)
    for _ in range(cut):
        optimizer.step()
        first.step()
    fresh = optimiser()  # Lightning's order: configure_optimizers, then the optimiser's state, then the scheduler's
    second = settings.build(fresh, total)
    fresh.load_state_dict(optimizer.state_dict())
    second.load_state_dict(first.state_dict())
    rest = []
    for _ in range(steps - cut):
        rest.append(fresh.param_groups[0]["lr"])
        fresh.step()
        second.step()
    return rest


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
        ScheduleSettings(**{"name": "cosine", "warmup_steps": 0, "min_lr_ratio": 0.0, **kwargs})
    if "name" in kwargs:  # the message lists the valid choices
        assert all(name in str(info.value) for name in SCHEDULES)
