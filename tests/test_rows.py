"""Image -> rows: positives, negatives at negative_ratio, cap, prompt modes, phrasings (numpy only)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from sam3lora.config import defaults
from sam3lora.data.rows import PromptSettings, build_rows
from sam3lora.sam3 import PAD_LABEL, VISUAL_PROMPT

PROMPTS = {1: ["red circle", "crimson disc"], 2: ["blue square"], 3: ["green triangle"], 4: ["yellow star"],
           5: ["magenta ring"], 6: ["cyan cross"]}
# instances: two of category 2, one of 5, three of 1 (normalised xyxy boxes)
CATS = np.array([2, 5, 2, 1, 1, 1])
BOXES = np.array([[0.1, 0.1, 0.3, 0.2], [0.5, 0.5, 0.9, 0.8], [0.0, 0.6, 0.2, 1.0],
                  [0.4, 0.0, 0.6, 0.3], [0.7, 0.1, 0.8, 0.4], [0.2, 0.3, 0.5, 0.5]], dtype=np.float32)


SHIPPED: PromptSettings = defaults("data/coco.prompts")


def settings(**overrides) -> PromptSettings:
    """The shipped data config's prompt settings with ``overrides`` (field names)."""
    return dataclasses.replace(SHIPPED, **overrides)


def rows_for(settings: PromptSettings, seed: int = 0, train: bool = True, cats=CATS, boxes=BOXES):
    return build_rows(cats, boxes, PROMPTS, settings, np.random.default_rng(seed), train=train)


def cxcywh_to_xyxy(b: np.ndarray) -> np.ndarray:
    return np.concatenate([b[:, :2] - b[:, 2:] / 2, b[:, :2] + b[:, 2:] / 2], axis=1)


def test_one_text_row_per_present_category_with_its_targets():
    rows = rows_for(settings(negative_ratio=0.0))
    assert [r.category_id for r in rows] == [1, 2, 5]
    for r in rows:
        assert set(CATS[r.targets]) == {r.category_id}
        assert len(r.targets) == int((r.category_id == CATS).sum())
        assert r.boxes.shape == (1, 4) and r.box_labels.tolist() == [PAD_LABEL]  # text-only: one pad box


def test_negatives_are_absent_categories_without_replacement_at_the_expected_ratio():
    counts = []
    for seed in range(300):
        rows = rows_for(settings(negative_ratio=0.5), seed=seed)
        negatives = [r for r in rows if r.is_negative]
        ids = [r.category_id for r in negatives]
        assert len(set(ids)) == len(ids) and set(ids) <= {3, 4, 6}
        assert all(r.box_labels.tolist() == [PAD_LABEL] for r in negatives)
        assert [r.is_negative for r in rows] == [False] * 3 + [True] * len(negatives)  # positives first
        counts.append(len(negatives))
    # 3 positives x 0.5 = 1.5 expected: stochastic rounding between 1 and 2
    assert set(counts) == {1, 2}
    assert abs(np.mean(counts) - 1.5) < 0.1
    assert len([r for r in rows_for(settings(negative_ratio=5.0)) if r.is_negative]) == 3  # capped by absent


def test_negative_ratio_null_and_validation_query_every_category():
    rows = rows_for(settings(negative_ratio=None))
    assert sorted(r.category_id for r in rows) == [1, 2, 3, 4, 5, 6]
    val = rows_for(settings(negative_ratio=0.0, max_prompts_per_image=1), train=False)
    assert [r.category_id for r in val] == [1, 2, 5, 3, 4, 6]  # no cap, no sampling, positives first
    assert val[0].text == "red circle"  # canonical phrasing
    again = rows_for(settings(negative_ratio=0.0, max_prompts_per_image=1), seed=9, train=False)
    assert [(r.category_id, r.text) for r in again] == [(r.category_id, r.text) for r in val]


def test_cap_keeps_positives_first():
    rows = rows_for(settings(negative_ratio=3.0, max_prompts_per_image=2))
    assert len(rows) == 2 and not any(r.is_negative for r in rows)
    rows = rows_for(settings(negative_ratio=3.0, max_prompts_per_image=4))
    assert [r.is_negative for r in rows] == [False, False, False, True]
    seen = {tuple(r.category_id for r in rows_for(settings(max_prompts_per_image=2), seed=s)) for s in range(30)}
    assert len(seen) > 1  # the kept positives are a random subset in training


def test_image_without_objects_yields_one_negative():
    empty = np.zeros((0,), np.int64), np.zeros((0, 4), np.float32)
    rows = rows_for(settings(negative_ratio=0.0), cats=empty[0], boxes=empty[1])
    assert len(rows) == 1 and rows[0].is_negative


def test_box_mode_uses_visual_text_and_exemplars_from_the_rows_targets():
    sizes = set()
    for seed in range(40):
        for r in rows_for(settings(mode="box", negative_ratio=1.0, max_exemplars=2), seed=seed):
            if r.is_negative:
                assert r.text != VISUAL_PROMPT and r.box_labels.tolist() == [PAD_LABEL]
                continue
            assert r.text == VISUAL_PROMPT
            assert 1 <= len(r.box_labels) <= min(2, len(r.targets)) and (r.box_labels == 1).all()
            xyxy = cxcywh_to_xyxy(r.boxes)
            for b in xyxy:  # each exemplar is one of this row's target boxes
                assert np.isclose(BOXES[r.targets], b, atol=1e-6).all(axis=1).any()
            assert len({tuple(b) for b in np.round(xyxy, 5)}) == len(xyxy)  # no repeats
            sizes.add(len(r.box_labels))
    assert sizes == {1, 2}


def test_text_and_box_mode_keeps_the_category_text():
    rows = rows_for(settings(mode="text+box", negative_ratio=0.0, max_exemplars=5), train=False)
    by_cat = {r.category_id: r for r in rows}
    assert by_cat[1].text == "red circle" and len(by_cat[1].box_labels) == 3  # val: all, up to max_exemplars
    assert np.allclose(cxcywh_to_xyxy(by_cat[1].boxes), BOXES[CATS == 1], atol=1e-6)


def test_training_picks_a_random_phrasing():
    texts = {r.text for s in range(30) for r in rows_for(settings(negative_ratio=0.0), seed=s)
             if r.category_id == 1}
    assert texts == {"red circle", "crimson disc"}


@pytest.mark.parametrize("kwargs", [{"mode": "points"}, {"negative_ratio": -1.0}, {"max_prompts_per_image": 0},
                                    {"max_exemplars": 0}])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError, match=rf"^data\.prompts\.{next(iter(kwargs))} must be"):
        settings(**kwargs)


def test_unknown_category_is_refused():
    with pytest.raises(ValueError, match=r"\[9\]"):
        rows_for(settings(), cats=np.array([9]), boxes=BOXES[:1])
