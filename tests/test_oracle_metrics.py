"""cgF1 / IL_MCC / pmF1 against Meta's official ``CGF1Evaluator``, COCO AP against plain ``COCOeval``.

Both sides get the same random (image, prompt) pairs: ground-truth masks, and predictions with scores around the
0.5 gate (some exact copies of the ground truth, some shifted, some spurious, negative pairs with and without
predictions). The official evaluator reads COCO files (one "image" per pair, one category); we feed our
accumulators the same masks.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from sam3_oracle import load_official

from sam3lora.metrics import CgF1Accumulator, CocoApAccumulator, encode_masks

H = W = 24


def rect(x0: int, y0: int, x1: int, y1: int) -> torch.Tensor:
    m = torch.zeros(H, W, dtype=torch.bool)
    m[y0:y1, x0:x1] = True
    return m


def random_pairs(seed: int, num_pairs: int = 14, negatives: bool = True) -> list[dict]:
    """Per pair: gt (G,H,W), pred (P,H,W), scores (P,)."""
    rng = np.random.default_rng(seed)
    pairs = []
    for i in range(num_pairs):
        num_gt = 0 if negatives and i % 4 == 3 else int(rng.integers(1, 4))
        gts = []
        for _ in range(num_gt):
            x, y = (int(v) for v in rng.integers(0, 16, 2))
            w, h = (int(v) for v in rng.integers(3, 8, 2))
            gts.append(rect(x, y, x + w, y + h))
        preds, scores = [], []
        for g in gts:
            if rng.random() < 0.8:
                shift = int(rng.integers(0, 3))
                preds.append(torch.roll(g, shifts=shift, dims=1))
                scores.append(float(rng.uniform(0.3, 1.0)))
        for _ in range(int(rng.integers(0, 3))):  # spurious ones
            x, y = (int(v) for v in rng.integers(0, 18, 2))
            preds.append(rect(x, y, x + 5, y + 5))
            scores.append(float(rng.uniform(0.0, 0.9)))
        stack = lambda ms: torch.stack(ms) if ms else torch.zeros(0, H, W, dtype=torch.bool)  # noqa: E731
        pairs.append({"gt": stack(gts), "pred": stack(preds), "scores": torch.tensor(scores, dtype=torch.float32)})
    return pairs


def write_official_files(pairs: list[dict], root: Path) -> tuple[Path, Path]:
    """One COCO "image" per pair (exhaustively annotated), one category; predictions as RLE."""
    images, anns, preds = [], [], []
    for i, pair in enumerate(pairs, start=1):
        images.append({"id": i, "height": H, "width": W, "is_instance_exhaustive": True})
        for rle, m in zip(encode_masks(pair["gt"]), pair["gt"], strict=True):
            ys, xs = torch.nonzero(m, as_tuple=True)
            box = [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": 1, "segmentation": rle,
                         "area": float(m.sum()), "bbox": box, "iscrowd": 0})
        for rle, score in zip(encode_masks(pair["pred"]), pair["scores"].tolist(), strict=True):
            preds.append({"image_id": i, "category_id": 1, "segmentation": rle, "score": score})
    gt_path, pred_path = root / "gt.json", root / "pred.json"
    gt_path.write_text(json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "x"}]}))
    pred_path.write_text(json.dumps(preds))
    return gt_path, pred_path


def official_cgf1(pairs: list[dict], root: Path) -> dict[str, float]:
    gt_path, pred_path = write_official_files(pairs, root)
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = load_official().cgf1_eval.CGF1Evaluator(str(gt_path), iou_type="segm")
        return evaluator.evaluate(str(pred_path))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("negatives", [True, False], ids=["with_negatives", "all_positive"])
def test_cgf1_equals_the_official_evaluator(tmp_path: Path, seed: int, negatives: bool) -> None:
    pairs = random_pairs(seed, negatives=negatives)
    theirs = official_cgf1(pairs, tmp_path)
    acc = CgF1Accumulator(score_threshold=0.5)
    for pair in pairs:
        acc.update(pair["pred"], pair["scores"], pair["gt"])
    ours = acc.compute()
    assert ours["cgF1"] / 100 == pytest.approx(theirs["cgF1_eval_segm_cgF1"], rel=1e-6, abs=1e-9)
    assert ours["IL_MCC"] == pytest.approx(theirs["cgF1_eval_segm_IL_MCC"], rel=1e-6, abs=1e-9)
    assert ours["pmF1"] / 100 == pytest.approx(theirs["cgF1_eval_segm_positive_micro_F1"], rel=1e-6, abs=1e-9)
    if not negatives:  # the edge case: no negative pair -> the official IL_MCC and cgF1 are 0
        assert ours["IL_MCC"] == 0.0 and ours["cgF1"] == 0.0


def test_cgf1_every_object_found_without_negatives_is_zero_officially(tmp_path: Path) -> None:
    g = rect(2, 2, 9, 9)
    pairs = [{"gt": g[None], "pred": g[None], "scores": torch.tensor([0.9])} for _ in range(3)]
    theirs = official_cgf1(pairs, tmp_path)
    acc = CgF1Accumulator()
    for pair in pairs:
        acc.update(pair["pred"], pair["scores"], pair["gt"])
    assert theirs["cgF1_eval_segm_cgF1"] == 0.0 and acc.compute()["cgF1"] == 0.0


@pytest.mark.parametrize("max_dets", [100, 2])
def test_coco_ap_equals_plain_cocoeval_on_the_written_detections(max_dets: int) -> None:
    """Several categories per image, more detections per image than max_dets: pycocotools' own rule decides."""
    pairs = random_pairs(5, num_pairs=12)
    acc = CocoApAccumulator(max_dets=max_dets, iou_types=("segm",))
    images, anns = {}, []
    for i, pair in enumerate(pairs):
        image_id, category_id = i // 3 + 1, i % 3 + 1  # 4 images x 3 categories
        images[image_id] = (H, W)
        acc.update(image_id, category_id, (H, W), pair["scores"], pred_masks=pair["pred"], gt_boxes=torch.tensor(
            [[0.0, 0.0, 1.0, 1.0]] * len(pair["gt"])).reshape(-1, 4), gt_masks=pair["gt"])
        for rle, m in zip(encode_masks(pair["gt"]), pair["gt"], strict=True):
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": category_id, "segmentation": rle,
                         "area": float(m.sum()), "bbox": [0.0, 0.0, 1.0, 1.0], "iscrowd": 0})
    ours = acc.compute()
    written = acc.results()
    assert len(written) == sum(len(p["scores"]) for p in pairs)  # nothing cut before pycocotools
    coco = COCO()
    coco.dataset = {"images": [{"id": i, "height": h, "width": w} for i, (h, w) in images.items()],
                    "categories": [{"id": c} for c in (1, 2, 3)], "annotations": anns}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(json.loads(json.dumps(written))), "segm")
        ev.params.maxDets = [1, 10, max_dets]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert [ours["segm_AP"], ours["segm_AP50"], ours["segm_AP75"]] == pytest.approx(list(ev.stats[:3]), abs=1e-12)
