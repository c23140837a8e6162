"""Metrics: mask IoU / Dice, matched-instance IoU / Dice, cgF1 by hand, COCO AP against pycocotools."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch
import torchmetrics
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchmetrics.utilities.data import dim_zero_sum

from sam3lora.metrics import (
    CgF1Accumulator,
    CocoApAccumulator,
    MatchedIoUDice,
    encode_masks,
    mask_dice,
    mask_iou,
    matched_iou_dice,
    write_coco_results,
)

H = W = 12


def rect(x0: int, y0: int, x1: int, y1: int, size: tuple[int, int] = (H, W)) -> torch.Tensor:
    """Bool mask with pixels [y0:y1, x0:x1] set."""
    m = torch.zeros(size, dtype=torch.bool)
    m[y0:y1, x0:x1] = True
    return m


def stack(*masks: torch.Tensor) -> torch.Tensor:
    return torch.stack(masks) if masks else torch.zeros(0, H, W, dtype=torch.bool)


# ---------------------------------------------------------------- IoU / Dice
def test_mask_iou_and_dice_hand_case() -> None:
    a = rect(0, 0, 2, 2)  # 4 px
    b = rect(0, 0, 4, 1)  # 4 px, overlap 2 px with a
    empty = torch.zeros(H, W, dtype=torch.bool)
    iou = mask_iou(stack(a, b, empty), stack(a, b, empty))
    assert iou.shape == (3, 3)
    assert iou[0, 0] == 1 and iou[0, 1] == pytest.approx(2 / 6) and iou[1, 0] == pytest.approx(2 / 6)
    assert iou[2, 2] == 0 and iou[0, 2] == 0
    dice = mask_dice(stack(a, b), stack(b, empty))
    assert dice[0, 0] == pytest.approx(2 * 2 / 8) and dice[1, 0] == 1 and dice[0, 1] == 0
    assert mask_iou(stack(), stack(a)).shape == (0, 1)


def test_mask_iou_equals_pycocotools() -> None:
    gen = torch.Generator().manual_seed(0)
    pred = torch.rand(4, H, W, generator=gen) > 0.5
    gt = torch.rand(3, H, W, generator=gen) > 0.6
    expected = mask_utils.iou(encode_masks(pred), encode_masks(gt), [0, 0, 0])
    np.testing.assert_allclose(mask_iou(pred, gt).numpy(), expected, rtol=1e-9)


def test_rejects_non_bool_masks() -> None:
    with pytest.raises(TypeError):
        mask_iou(torch.zeros(1, H, W), torch.zeros(1, H, W, dtype=torch.bool))


def test_matched_iou_dice_with_and_without_indices() -> None:
    g0, g1, g2 = rect(0, 0, 4, 4), rect(6, 6, 10, 10), rect(0, 8, 3, 12)
    p0 = rect(0, 0, 4, 2)  # IoU 0.5 with g0, dice 2/3
    p1 = rect(6, 6, 10, 10)  # exact g1
    p2 = rect(0, 8, 3, 12)  # exact g2 but low score
    preds, scores, gts = stack(p0, p1, p2), torch.tensor([0.9, 0.8, 0.2]), stack(g0, g1, g2)
    iou, dice = matched_iou_dice(preds, scores, gts, score_threshold=0.5)
    assert iou.tolist() == pytest.approx([0.5, 1.0, 0.0]) and dice.tolist() == pytest.approx(
        [2 / 3, 1.0, 0.0]
    )
    # criterion's indices reused: query 2 scores below the threshold -> its GT counts 0
    indices = (torch.tensor([0, 1, 2]), torch.tensor([1, 0, 2]))
    iou, dice = matched_iou_dice(preds, scores, gts, 0.5, indices=indices)
    assert iou.tolist() == pytest.approx([0.0, 0.0, 0.0])
    iou, _ = matched_iou_dice(preds, scores, gts, 0.1, indices=(torch.tensor([0, 2]), torch.tensor([0, 2])))
    assert iou.tolist() == pytest.approx([0.5, 0.0, 1.0])
    iou, _ = matched_iou_dice(preds, scores, gts, 0.5, gt_valid=torch.tensor([True, True, False]))
    assert iou.tolist() == pytest.approx([0.5, 1.0])

    acc = MatchedIoUDice(score_threshold=0.5)
    acc.update(preds, scores, gts)
    acc.update(stack(), torch.zeros(0), stack(g0))  # missed instance counts 0
    acc.update(stack(p0), torch.tensor([0.9]), stack())  # no GT: nothing counted
    out = acc.compute()
    assert out["num_instances"] == 4
    assert out["iou"] == pytest.approx(1.5 / 4) and out["dice"] == pytest.approx((2 / 3 + 1) / 4)


# ---------------------------------------------------------------- cgF1
def test_cgf1_perfect_is_100() -> None:
    acc = CgF1Accumulator()
    g = stack(rect(0, 0, 4, 4), rect(5, 5, 9, 9))
    acc.update(g, torch.tensor([0.9, 0.6]), g)
    acc.update(g[:1], torch.tensor([0.99]), g[:1])
    acc.update(stack(rect(0, 0, 2, 2)), torch.tensor([0.1]), stack())  # negative pair, only a low score
    out = acc.compute()
    # the official epsilons keep a perfect run a hair under 100: P = R = 3 / (3 + 1e-4), MCC = 2 / (2 + 1e-6)
    p = 3 / (3 + 1e-4)
    pm = 2 * p * p / (2 * p + 1e-4)
    mcc = 2 / (2 + 1e-6)
    assert out == {"cgF1": pytest.approx(100 * pm * mcc, rel=1e-12), "IL_MCC": pytest.approx(mcc, rel=1e-12),
                   "pmF1": pytest.approx(100 * pm, rel=1e-12), "num_pairs": 3}
    assert out["cgF1"] > 99.99


def test_cgf1_is_zero_without_negative_pairs_as_the_official_evaluator() -> None:
    """No negative pair and every object found: IL_MCC's denominator is 0, so IL_MCC = cgF1 = 0 (official)."""
    acc = CgF1Accumulator()
    g = stack(rect(0, 0, 4, 4))
    acc.update(g, torch.tensor([0.9]), g)
    out = acc.compute()
    assert out["IL_MCC"] == 0.0 and out["cgF1"] == 0.0 and out["pmF1"] > 99.9


def test_cgf1_empty_predictions_on_positive_pairs() -> None:
    acc = CgF1Accumulator()
    acc.update(stack(), torch.zeros(0), stack(rect(0, 0, 4, 4)))
    acc.update(stack(rect(0, 0, 4, 4)), torch.tensor([0.3]), stack(rect(0, 0, 4, 4), rect(6, 6, 8, 8)))
    acc.update(stack(), torch.zeros(0), stack())
    out = acc.compute()
    # IL: FN=2, TN=1 -> MCC denominator 0 with errors -> 0; pmF1: TP=0, FN=3 -> 0
    assert out["IL_MCC"] == 0.0 and out["pmF1"] == 0.0 and out["cgF1"] == 0.0
    assert acc.fn.tolist() == [3] * 10 and acc.il.tolist() == [0, 0, 1, 2]


def test_cgf1_all_false_positives() -> None:
    acc = CgF1Accumulator()
    acc.update(stack(rect(8, 8, 12, 12)), torch.tensor([0.9]), stack(rect(0, 0, 4, 4)))  # wrong place
    acc.update(stack(rect(0, 0, 4, 4)), torch.tensor([0.8]), stack())  # prediction on a negative pair
    out = acc.compute()
    assert out["cgF1"] == 0.0 and out["IL_MCC"] == 0.0 and out["pmF1"] == 0.0
    assert acc.fp.tolist() == [1] * 10  # the negative pair's FP is not a pmF1 FP
    only_negatives = CgF1Accumulator()
    only_negatives.update(stack(rect(0, 0, 4, 4)), torch.tensor([0.8]), stack())
    # as the official evaluator: no TP -> pmF1 0; the image-level error zeroes cgF1
    assert only_negatives.compute()["cgF1"] == 0.0 and only_negatives.compute()["pmF1"] == 0.0


def test_cgf1_mixed_hand_computed() -> None:
    acc = CgF1Accumulator()
    g1, g2 = rect(0, 0, 4, 4), rect(6, 0, 10, 2)  # g2: 8 px
    partial = rect(6, 0, 10, 2)
    partial[1, 7:10] = False  # 5 px inside g2 -> IoU 5/8
    # A: exact g1, IoU 0.625 on g2, one low-score prediction ignored
    acc.update(stack(g1, partial, rect(0, 8, 4, 12)), torch.tensor([0.9, 0.8, 0.3]), stack(g1, g2))
    acc.update(stack(), torch.zeros(0), stack(g1))  # B: missed pair
    acc.update(stack(g1), torch.tensor([0.7]), stack())  # C: false positive pair
    acc.update(stack(), torch.zeros(0), stack())  # D: true negative pair
    acc.update(stack(g2), torch.tensor([0.95]), stack(g2))  # E: exact
    out = acc.compute()
    # IL: TP=2 (A,E), FN=1 (B), FP=1 (C), TN=1 (D): MCC = (2*1 - 1*1) / sqrt(3*3*2*2) = 1/6
    mcc = 1 / 6
    # t in {.50,.55,.60}: TP=3 FP=0 FN=1 -> F1 6/7; other 7 thresholds: TP=2 FP=1 FN=2 -> F1 4/7
    pm = (3 * 6 / 7 + 7 * 4 / 7) / 10
    assert out["IL_MCC"] == pytest.approx(mcc, rel=1e-5)  # official epsilons: 1e-6 / 1e-4 in the denominators
    assert out["pmF1"] == pytest.approx(100 * pm, rel=1e-3)  # small counts: the 1e-4 epsilons show
    assert out["cgF1"] == pytest.approx(100 * pm * mcc, rel=1e-3)
    assert acc.compute() == out
    assert isinstance(acc, torchmetrics.Metric) and acc._reductions == {"il": dim_zero_sum, "tp": dim_zero_sum,
                                                                           "fp": dim_zero_sum, "fn": dim_zero_sum}
    acc.reset()
    assert acc.compute()["num_pairs"] == 0


# ---------------------------------------------------------------- COCO AP
def _box_of(mask: torch.Tensor) -> list[float]:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def _boxes(masks: torch.Tensor) -> torch.Tensor:
    return torch.tensor([_box_of(m) for m in masks]).reshape(-1, 4)


def test_coco_ap_perfect_is_one() -> None:
    acc = CocoApAccumulator()
    gt = {
        (1, 1): stack(rect(0, 0, 4, 4), rect(6, 6, 11, 10)),
        (1, 2): stack(),
        (2, 1): stack(rect(2, 3, 7, 9)),
        (2, 2): stack(rect(8, 0, 12, 5)),
    }
    for (img, cat), masks in gt.items():
        scores = torch.linspace(0.9, 0.6, len(masks))
        acc.update(img, cat, (H, W), scores, _boxes(masks), masks, _boxes(masks), masks)
    out = acc.compute()
    assert set(out) == {f"{t}_{m}" for t in ("segm", "bbox") for m in ("AP", "AP50", "AP75")}
    assert all(v == pytest.approx(1.0) for v in out.values()), out


def _direct_cocoeval(gts: list[tuple], dets: list[tuple], iou_type: str, images: list[int]) -> list[float]:
    """Independent pycocotools run: gts/dets as (image_id, category_id, mask[, score])."""
    anns = []
    for i, (img, cat, m) in enumerate(gts, start=1):
        rle = mask_utils.encode(np.asfortranarray(m.numpy().astype(np.uint8)))
        box = mask_utils.toBbox(rle).tolist()
        anns.append(
            {"id": i, "image_id": img, "category_id": cat, "segmentation": rle, "bbox": box,
             "area": float(mask_utils.area(rle)), "iscrowd": 0}
        )  # fmt: skip
    coco = COCO()
    coco.dataset = {
        "images": [{"id": i, "height": H, "width": W} for i in images],
        "categories": [{"id": 1}, {"id": 2}],
        "annotations": anns,
    }
    res = []
    for img, cat, m, score in dets:
        rle = mask_utils.encode(np.asfortranarray(m.numpy().astype(np.uint8)))
        entry = {"image_id": img, "category_id": cat, "score": score}
        entry["segmentation" if iou_type == "segm" else "bbox"] = (
            rle if iou_type == "segm" else mask_utils.toBbox(rle).tolist()
        )
        res.append(entry)
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(res), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats[:3].tolist()


def test_coco_ap_equals_direct_cocoeval() -> None:
    gen = torch.Generator().manual_seed(0)
    gts = [
        (1, 1, rect(0, 0, 4, 4)),
        (1, 1, rect(6, 6, 11, 10)),
        (1, 2, rect(8, 0, 12, 5)),
        (2, 1, rect(2, 3, 7, 9)),
    ]
    dets = [
        (1, 1, rect(0, 0, 4, 3), 0.9),  # IoU 0.75
        (1, 1, rect(7, 6, 11, 10), 0.4),  # IoU 0.8
        (1, 1, rect(0, 8, 3, 12), 0.7),  # false positive
        (1, 2, rect(8, 0, 12, 4), 0.6),  # IoU 0.8
        (2, 1, rect(3, 4, 7, 9), 0.5),  # IoU 0.67
        (2, 2, rect(0, 0, 5, 5), 0.95),  # false positive on a negative pair
    ]
    dets.append((2, 1, torch.rand(H, W, generator=gen) > 0.7, 0.3))
    acc = CocoApAccumulator()
    for img, cat in [(1, 1), (1, 2), (2, 1), (2, 2)]:
        g = stack(*[m for i, c, m in gts if (i, c) == (img, cat)])
        d = [(m, s) for i, c, m, s in dets if (i, c) == (img, cat)]
        pm = stack(*[m for m, _ in d])
        acc.update(img, cat, (H, W), torch.tensor([s for _, s in d]), _boxes(pm), pm, _boxes(g), g)
    out = acc.compute()
    for iou_type in ("segm", "bbox"):
        expected = _direct_cocoeval(gts, dets, iou_type, [1, 2])
        got = [out[f"{iou_type}_AP"], out[f"{iou_type}_AP50"], out[f"{iou_type}_AP75"]]
        assert got == pytest.approx(expected, abs=1e-9), iou_type
        assert 0 < got[0] < 1


def test_coco_results_keep_every_detection_and_json(tmp_path) -> None:
    """No cut across categories: pycocotools applies maxDets per (image, category) itself."""
    acc = CocoApAccumulator(max_dets=2)
    masks = stack(rect(0, 0, 4, 4), rect(5, 5, 9, 9), rect(0, 6, 3, 9))
    acc.update(
        7, 1, (H, W), torch.tensor([0.2, 0.9]), _boxes(masks[:2]), masks[:2], _boxes(masks[:1]), masks[:1]
    )
    acc.update(7, 2, (H, W), torch.tensor([0.5]), _boxes(masks[2:]), masks[2:])
    results = acc.results()
    assert sorted(r["score"] for r in results) == pytest.approx([0.2, 0.5, 0.9])
    path = write_coco_results(tmp_path / "out" / "dets.json", results)
    assert json.loads(path.read_text()) == results
    assert [p.name for p in path.parent.iterdir()] == ["dets.json"]
    assert isinstance(results[0]["segmentation"]["counts"], str)


def test_box_only_gt_is_crowd_for_segm() -> None:
    acc = CocoApAccumulator()
    masks = stack(rect(0, 0, 4, 4), rect(6, 6, 11, 10))
    gt_boxes = _boxes(masks)
    # predictions hit both GT; the second GT has no mask (box-only)
    acc.update(
        1, 1, (H, W), torch.tensor([0.9, 0.95]), gt_boxes, masks, gt_boxes, masks, torch.tensor([True, False])
    )
    out = acc.compute()
    assert out["segm_AP"] == pytest.approx(1.0) and out["bbox_AP"] == pytest.approx(1.0)


def test_coco_edge_cases() -> None:
    acc = CocoApAccumulator(iou_types=("bbox",))
    acc.update(1, 1, (H, W), torch.zeros(0), torch.zeros(0, 4), gt_boxes=torch.tensor([[0.0, 0.0, 4.0, 4.0]]))
    assert acc.compute() == {"bbox_AP": 0.0, "bbox_AP50": 0.0, "bbox_AP75": 0.0}
    acc.reset()
    acc.update(1, 1, (H, W), torch.tensor([0.5]), torch.tensor([[0.0, 0.0, 4.0, 4.0]]))
    assert acc.compute()["bbox_AP"] == -1.0
    with pytest.raises(ValueError):
        acc.update(1, 2, (H + 1, W), torch.zeros(0))
