"""HungarianMatcher: optimality against brute force, the cost formula, sign convention, negatives."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from sam3lora.loss.matcher import HungarianMatcher, focal_class_cost

YAML = Path(__file__).resolve().parents[1] / "conf" / "loss" / "sam3.yaml"


@pytest.fixture(scope="module")
def matcher() -> HungarianMatcher:
    return instantiate(OmegaConf.load(YAML).matcher)


def random_boxes(n: int, gen: torch.Generator) -> torch.Tensor:
    """(n,4) valid normalised xyxy boxes."""
    xy = torch.rand(n, 2, generator=gen) * 0.6
    wh = torch.rand(n, 2, generator=gen) * 0.35 + 0.05
    return torch.cat([xy, xy + wh], dim=1)


def direct_cost(logit: float, pbox: list[float], tbox: list[float]) -> float:
    """The official cost written out for one (query, target) pair with the yaml's numbers."""
    p = 1 / (1 + math.exp(-logit))
    cls = -0.25 * (1 - p) ** 2 * math.log(p) + 0.75 * p**2 * math.log(1 - p)

    def cxcywh(b: list[float]) -> list[float]:
        return [(b[0] + b[2]) / 2, (b[1] + b[3]) / 2, b[2] - b[0], b[3] - b[1]]

    l1 = sum(abs(a - b) for a, b in zip(cxcywh(pbox), cxcywh(tbox), strict=True))
    iw = max(0.0, min(pbox[2], tbox[2]) - max(pbox[0], tbox[0]))
    ih = max(0.0, min(pbox[3], tbox[3]) - max(pbox[1], tbox[1]))
    inter = iw * ih
    area_p = (pbox[2] - pbox[0]) * (pbox[3] - pbox[1])
    area_t = (tbox[2] - tbox[0]) * (tbox[3] - tbox[1])
    union = area_p + area_t - inter
    hull = (max(pbox[2], tbox[2]) - min(pbox[0], tbox[0])) * (max(pbox[3], tbox[3]) - min(pbox[1], tbox[1]))
    giou = inter / union - (hull - union) / hull
    return 5 * l1 + 2 * cls - 2 * giou


def test_yaml_values(matcher: HungarianMatcher) -> None:
    assert (matcher.cost_bbox, matcher.cost_class, matcher.cost_giou) == (5.0, 2.0, 2.0)
    assert (matcher.focal_alpha, matcher.focal_gamma) == (0.25, 2.0)


def test_cost_matrix_matches_formula(matcher: HungarianMatcher) -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, generator=gen) * 2
    pred, tgt = random_boxes(4, gen), random_boxes(3, gen)
    cost = matcher.cost_matrix(logits, pred, tgt)
    for i, j in itertools.product(range(4), range(3)):
        expected = direct_cost(logits[i].item(), pred[i].tolist(), tgt[j].tolist())
        assert cost[i, j].item() == pytest.approx(expected, rel=1e-4, abs=1e-4)


def test_class_cost_is_low_for_confident_queries() -> None:
    probs = torch.linspace(0.01, 0.99, 50)
    cost = focal_class_cost(probs, 0.25, 2.0)
    assert torch.all(cost[1:] < cost[:-1])
    assert cost[-1] < 0 < cost[0]


def test_prefers_high_scoring_query_at_equal_boxes(matcher: HungarianMatcher) -> None:
    box = torch.tensor([[0.2, 0.2, 0.5, 0.6]])
    pred_boxes = box.expand(3, 4)[None].clone()
    pred_logits = torch.tensor([[-3.0, 4.0, 0.0]])
    ((q, t),) = matcher(pred_logits, pred_boxes, [{"boxes": box}])
    assert q.tolist() == [1] and t.tolist() == [0]


@pytest.mark.parametrize("seed", range(6))
def test_equals_brute_force(matcher: HungarianMatcher, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    num_rows, num_queries = 3, 5
    sizes = [int(torch.randint(0, 4, (1,), generator=gen)) for _ in range(num_rows)]
    sizes[0] = max(sizes[0], 1)
    logits = torch.randn(num_rows, num_queries, generator=gen) * 2
    boxes = random_boxes(num_rows * num_queries, gen).view(num_rows, num_queries, 4)
    targets = [{"boxes": random_boxes(n, gen)} for n in sizes]
    indices = matcher(logits, boxes, targets)
    assert len(indices) == num_rows
    for r, (q, t) in enumerate(indices):
        n = sizes[r]
        assert q.dtype == torch.int64 and len(q) == len(t) == n
        assert len(set(q.tolist())) == n and sorted(t.tolist()) == list(range(n))
        if n == 0:
            continue
        cost = matcher.cost_matrix(logits[r], boxes[r], targets[r]["boxes"])
        got = cost[q, t].sum().item()
        best = min(
            sum(cost[perm[j], j].item() for j in range(n))
            for perm in itertools.permutations(range(num_queries), n)
        )
        assert got == pytest.approx(best, abs=1e-5)


def test_negatives_get_empty_matches(matcher: HungarianMatcher) -> None:
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 4, generator=gen)
    boxes = random_boxes(12, gen).view(3, 4, 4)
    targets = [{"boxes": torch.zeros(0, 4)}, {"boxes": random_boxes(2, gen)}, {"boxes": torch.zeros(0, 4)}]
    indices = matcher(logits, boxes, targets)
    assert [len(q) for q, _ in indices] == [0, 2, 0]
    all_negative = matcher(logits, boxes, [{"boxes": torch.zeros(0, 4)}] * 3)
    assert all(len(q) == 0 and len(t) == 0 for q, t in all_negative)


def test_non_finite_costs_do_not_crash(matcher: HungarianMatcher) -> None:
    boxes = random_boxes(3, torch.Generator().manual_seed(2))[None]
    boxes[0, 0] = float("nan")
    ((q, _),) = matcher(torch.zeros(1, 3), boxes, [{"boxes": boxes[0, 1:2].clone()}])
    assert q.tolist() == [1]


def test_rejects_wrong_row_count(matcher: HungarianMatcher) -> None:
    with pytest.raises(ValueError):
        matcher(torch.zeros(2, 3), torch.zeros(2, 3, 4), [{"boxes": torch.zeros(0, 4)}])
