"""Validation metrics: mask IoU / Dice, matched-instance IoU / Dice, SAM 3's cgF1 (IL_MCC, pmF1) and COCO AP.

Conventions: one (image, prompt) pair is one batch row; masks are bool tensors of one pixel space per pair
(or per image for COCO AP); a prediction's score is the caller's (SAM 3 uses sigmoid(logit) *
sigmoid(presence)). Accumulators keep only small counts or RLE-encoded detections, never dense masks.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from scipy.optimize import linear_sum_assignment
from torch import Tensor
from torchmetrics import Metric
from torchvision.ops import box_convert

from sam3lora.io import write_whole

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
"""0.50:0.05:0.95, as COCO and SAM 3's cgF1."""


def _check_masks(name: str, masks: Tensor) -> None:
    if masks.dtype != torch.bool or masks.dim() != 3:
        raise TypeError(f"{name} must be a bool tensor (N,H,W), got {masks.dtype} {tuple(masks.shape)}")


def _overlaps(pred: Tensor, gt: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Intersections (N,M) and areas (N,), (M,) of bool masks (N,H,W), (M,H,W), as float64."""
    _check_masks("pred", pred)
    _check_masks("gt", gt)
    if pred.shape[-2:] != gt.shape[-2:]:
        raise ValueError(f"mask sizes differ: {tuple(pred.shape[-2:])} vs {tuple(gt.shape[-2:])}")
    p = pred.flatten(1).to(torch.float32)
    g = gt.flatten(1).to(pred.device, torch.float32)
    # float32 counts are exact up to 2^24 pixels; autocast off so that a bf16 context cannot round them
    with torch.autocast(device_type=p.device.type, enabled=False):
        inter = p @ g.T if len(p) and len(g) else p.new_zeros(len(p), len(g))
    return inter.double(), p.sum(1).double(), g.sum(1).double()


def mask_iou(pred: Tensor, gt: Tensor) -> Tensor:
    """Pairwise IoU of bool masks: pred (N,H,W), gt (M,H,W) -> (N,M) float64. Empty vs empty is 0.

    Uses one (N, H*W) x (H*W, M) product: memory O((N+M) H W) floats, so pass only the masks you need.
    """
    inter, area_p, area_g = _overlaps(pred, gt)
    union = area_p[:, None] + area_g[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(inter))


def mask_dice(pred: Tensor, gt: Tensor) -> Tensor:
    """Pairwise Dice 2|A&B| / (|A|+|B|) of bool masks (N,H,W), (M,H,W) -> (N,M) float64; empty vs empty: 0."""
    inter, area_p, area_g = _overlaps(pred, gt)
    total = area_p[:, None] + area_g[None, :]
    return torch.where(total > 0, 2 * inter / total.clamp(min=1), torch.zeros_like(inter))


def _paired_iou_dice(pred: Tensor, gt: Tensor) -> tuple[Tensor, Tensor]:
    """IoU and Dice of corresponding bool masks (K,H,W), (K,H,W) -> (K,), (K,) float64."""
    p, g = pred.flatten(1), gt.flatten(1).to(pred.device)
    inter = (p & g).sum(1).double()
    area_p, area_g = p.sum(1).double(), g.sum(1).double()
    union, total = area_p + area_g - inter, area_p + area_g
    iou = torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(inter))
    dice = torch.where(total > 0, 2 * inter / total.clamp(min=1), torch.zeros_like(inter))
    return iou, dice


def matched_iou_dice(
    pred_masks: Tensor,
    scores: Tensor,
    gt_masks: Tensor,
    score_threshold: float = 0.5,
    indices: tuple[Tensor, Tensor] | None = None,
    gt_valid: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """IoU and Dice of every counted GT instance of one (image, prompt) pair with its matched prediction.

    What counts (val/iou, val/dice): each GT instance with a mask (``gt_valid``, default all) gets the IoU /
    Dice of the prediction it is matched to if that prediction scores >= ``score_threshold``, else 0 (missed
    instances count as 0, so a model cannot look good by predicting little). Predictions never matched do not
    count here (false positives are what cgF1 measures); pairs without GT contribute nothing.

    Matching: ``indices = (query_idx, target_idx)`` from ``Sam3Criterion.match`` (no second matching;
    query_idx indexes ``pred_masks``), or, when None, a Hungarian matching on mask IoU among the predictions
    above the threshold.

    Args:
        pred_masks: (P,H,W) bool binarised predictions (e.g. all Q queries).
        scores: (P,) prediction scores.
        gt_masks: (G,H,W) bool.
        gt_valid: (G,) bool, instances that carry a real mask (``has_mask``).
    Returns:
        (iou, dice), each (G_valid,) float64 on ``pred_masks``' device.
    """
    _check_masks("pred_masks", pred_masks)
    _check_masks("gt_masks", gt_masks)
    num_gt = len(gt_masks)
    iou = torch.zeros(num_gt, dtype=torch.float64, device=pred_masks.device)
    dice = torch.zeros_like(iou)
    scores = scores.to(pred_masks.device)
    if indices is not None:
        q, t = (x.to(pred_masks.device) for x in indices)
        ok = scores[q] >= score_threshold
        q, t = q[ok], t[ok]
        if len(q):
            iou[t], dice[t] = _paired_iou_dice(pred_masks[q], gt_masks[t])
    else:
        kept = torch.nonzero(scores >= score_threshold).flatten()
        if len(kept) and num_gt:
            ious = mask_iou(pred_masks[kept], gt_masks)
            qi, ti = linear_sum_assignment(-ious.cpu().numpy())
            q = kept[torch.as_tensor(qi, device=kept.device)]
            t = torch.as_tensor(ti, device=pred_masks.device)
            iou[t], dice[t] = _paired_iou_dice(pred_masks[q], gt_masks[t])
    if gt_valid is not None:
        valid = gt_valid.to(pred_masks.device).bool()
        iou, dice = iou[valid], dice[valid]
    return iou, dice


class MatchedIoUDice(Metric):
    """Mean matched-instance IoU and Dice over a dataset (see ``matched_iou_dice`` for what counts).

    State (summed over DDP processes by torchmetrics): ``sums`` = (IoU sum, Dice sum, instance count), float64.
    """

    full_state_update = False

    def __init__(self, score_threshold: float = 0.5, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.score_threshold = score_threshold
        self.add_state("sums", default=torch.zeros(3, dtype=torch.float64), dist_reduce_fx="sum")

    def update(
        self,
        pred_masks: Tensor,
        scores: Tensor,
        gt_masks: Tensor,
        indices: tuple[Tensor, Tensor] | None = None,
        gt_valid: Tensor | None = None,
    ) -> None:
        """Add one (image, prompt) pair; arguments as ``matched_iou_dice``."""
        iou, dice = matched_iou_dice(pred_masks, scores, gt_masks, self.score_threshold, indices, gt_valid)
        self.sums += torch.stack([iou.sum(), dice.sum(), iou.new_tensor(float(len(iou)))]).to(self.sums)

    def compute(self) -> dict[str, float]:
        """``{"iou": mean, "dice": mean, "num_instances": n}``; means are 0 when no GT instance was seen."""
        iou_sum, dice_sum, n = (float(x) for x in self.sums)
        return {"iou": iou_sum / n if n else 0.0, "dice": dice_sum / n if n else 0.0, "num_instances": n}


class CgF1Accumulator(Metric):
    """SAM 3's classification-gated F1 over (image, prompt) pairs, computed as ``sam3/eval/cgf1_eval.py``.

    Per pair: predictions with score >= ``score_threshold`` are kept and Hungarian-matched to the GT masks on
    IoU (maximising total IoU, once); at each IoU threshold t in 0.50:0.05:0.95 a match with IoU >= t is a TP,
    FP = kept - TP, FN = GT - TP. Pair level: "has GT" vs "has kept predictions" gives IL_TP/FP/TN/FN.

    Dataset level, per threshold: TP and FN are summed over every pair with GT (a pair with GT and no
    predictions adds all its GT to FN); FP only over pairs with both GT and predictions (predictions on a
    GT-free pair are image-level false positives, which IL_MCC punishes). With the official epsilons:
    P_t = TP / (TP + FP + 1e-4), R_t = TP / (TP + FN + 1e-4), pmF1_t = 2 P R / (P + R + 1e-4);
    IL_MCC = (TP*TN - FP*FN) / (sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) + 1e-6) over pairs;
    cgF1 = mean over t of pmF1_t * IL_MCC (values <= -1 left out, as the official summary).

    So an all-positive (or all-negative) validation set has IL_MCC = cgF1 = 0 however good the masks, exactly as
    the official evaluator: add negative prompts to the validation split (the datamodule queries every category
    on every image) for a meaningful cgF1. tests/test_oracle_metrics.py compares against the official code.

    Returned scale as in the paper (cgF1 54.1, IL_MCC 0.82, pmF1 66.1): cgF1, pmF1 x100; IL_MCC in [-1, 1].
    State (int64 counts, summed over DDP processes by torchmetrics): ``il`` (IL_TP, IL_FP, IL_TN, IL_FN) and, per
    IoU threshold, ``tp``, ``fp`` (pairs with GT and predictions only) and ``fn``.
    """

    full_state_update = False

    def __init__(
        self, score_threshold: float = 0.5, iou_thresholds: Sequence[float] = tuple(IOU_THRESHOLDS), **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.score_threshold = score_threshold
        self.iou_thresholds = np.asarray(iou_thresholds, dtype=np.float64)
        k = len(self.iou_thresholds)
        self.add_state("il", default=torch.zeros(4, dtype=torch.int64), dist_reduce_fx="sum")
        for name in ("tp", "fp", "fn"):
            self.add_state(name, default=torch.zeros(k, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, pred_masks: Tensor, scores: Tensor, gt_masks: Tensor) -> None:
        """Add one (image, prompt) pair: pred_masks (P,H,W) bool, scores (P,), gt_masks (G,H,W) bool.

        Pass every query of the pair (or at least every one scoring >= the threshold): the rest are dropped here.
        """
        _check_masks("pred_masks", pred_masks)
        _check_masks("gt_masks", gt_masks)
        kept = pred_masks[scores.to(pred_masks.device) >= self.score_threshold]
        num_dt, num_gt = len(kept), len(gt_masks)
        if num_gt == 0:
            self.il[1 if num_dt else 2] += 1
            return
        if num_dt == 0:
            self.il[3] += 1
            self.fn += num_gt
            return
        self.il[0] += 1
        ious = mask_iou(kept, gt_masks).cpu().numpy()
        qi, ti = linear_sum_assignment(-ious)
        matched = ious[qi, ti]
        tp = torch.as_tensor((matched[None, :] >= self.iou_thresholds[:, None]).sum(1), device=self.tp.device)
        self.tp += tp
        self.fp += num_dt - tp
        self.fn += num_gt - tp

    def il_mcc(self) -> float:
        """Matthews correlation of "pair has GT" vs "pair has predictions" (official +1e-6 in the denominator)."""
        tp, fp, tn, fn = (float(x) for x in self.il.tolist())
        return (tp * tn - fp * fn) / (float(np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))) + 1e-6)

    def pm_f1_per_threshold(self) -> np.ndarray:
        """Positive micro F1 at each IoU threshold, in [0, 1] (official epsilons)."""
        tp, fp, fn = (x.cpu().numpy().astype(np.float64) for x in (self.tp, self.fp, self.fn))
        precision = tp / (tp + fp + 1e-4)
        recall = tp / (tp + fn + 1e-4)
        return 2 * precision * recall / (precision + recall + 1e-4)

    def compute(self) -> dict[str, float]:
        """``{"cgF1": x100, "IL_MCC": [-1,1], "pmF1": x100, "num_pairs": n}``; all 0 before any update."""
        pairs = float(self.il.sum())
        if pairs == 0:
            return {"cgF1": 0.0, "IL_MCC": 0.0, "pmF1": 0.0, "num_pairs": 0.0}
        mcc = self.il_mcc()
        pm = self.pm_f1_per_threshold()
        gated = pm * mcc
        gated = gated[gated > -1]
        return {
            "cgF1": float(100.0 * gated.mean()) if len(gated) else -100.0,
            "IL_MCC": float(mcc),
            "pmF1": float(100.0 * pm.mean()),
            "num_pairs": pairs,
        }


def encode_masks(masks: Tensor) -> list[dict[str, Any]]:
    """Bool masks (N,H,W) -> N COCO RLEs ``{"size": [H, W], "counts": str}`` (JSON-ready)."""
    _check_masks("masks", masks)
    if len(masks) == 0:
        return []
    arr = np.asfortranarray(masks.permute(1, 2, 0).cpu().numpy().astype(np.uint8))
    rles = mask_utils.encode(arr)
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def _xyxy_to_xywh(boxes: Tensor) -> list[list[float]]:
    return box_convert(boxes.detach().float().cpu().reshape(-1, 4), "xyxy", "xywh").tolist()


def write_coco_results(path: str | os.PathLike[str], results: Iterable[dict[str, Any]]) -> Path:
    """Write COCO-format detections as one JSON list, whole or not at all."""
    return write_whole(path, json.dumps(list(results)))


class CocoApAccumulator:
    """COCO AP / AP50 / AP75 for ``segm`` and ``bbox`` with pycocotools, fed one (image, category) at a time.

    Ground truth comes with the pairs (every category is queried on every image, so an image with GT-free
    pairs is still evaluated). Detections are RLE-encoded on arrival; ``compute`` runs ``COCOeval`` (maxDets 1,
    10, ``max_dets``) on exactly the detections ``results`` returns, with pycocotools' own rule: at most
    ``max_dets`` detections per (image, category), i.e. per pair. Nothing is cut across categories, so the AP
    equals plain ``COCOeval`` on the written results whatever their number.

    Box-only GT instances (``gt_has_mask`` False) count normally for ``bbox``; for ``segm`` they become crowd
    regions shaped as their box, so detections on them are ignored rather than counted as false positives.
    All masks and boxes of one image must live in the same pixel space (boxes xyxy in pixels).
    """

    def __init__(self, max_dets: int = 100, iou_types: Sequence[str] = ("segm", "bbox")) -> None:
        unknown = set(iou_types) - {"segm", "bbox"}
        if unknown:
            raise ValueError(f"unknown iou types {sorted(unknown)}")
        self.max_dets = max_dets
        self.iou_types = tuple(iou_types)
        self.reset()

    def reset(self) -> None:
        """Forget everything seen so far."""
        self.images: dict[int, tuple[int, int]] = {}
        self.categories: set[int] = set()
        self.gts: list[dict[str, Any]] = []
        self.dets: list[dict[str, Any]] = []

    def update(
        self,
        image_id: int,
        category_id: int,
        image_size: tuple[int, int],
        pred_scores: Tensor,
        pred_boxes: Tensor | None = None,
        pred_masks: Tensor | None = None,
        gt_boxes: Tensor | None = None,
        gt_masks: Tensor | None = None,
        gt_has_mask: Tensor | None = None,
    ) -> None:
        """Add one (image, category) pair.

        Args:
            image_size: (H, W) of the pixel space of the boxes and masks.
            pred_scores: (P,); pred_boxes (P,4) xyxy pixels (needed for bbox); pred_masks (P,H,W) bool (segm).
            gt_boxes: (G,4) xyxy pixels; gt_masks (G,H,W) bool; gt_has_mask (G,) bool (default all True when
                gt_masks is given). G may be 0 (negative prompt).
        """
        image_id, category_id = int(image_id), int(category_id)
        size = (int(image_size[0]), int(image_size[1]))
        if self.images.setdefault(image_id, size) != size:
            raise ValueError(f"image {image_id}: size {size} differs from {self.images[image_id]}")
        self.categories.add(category_id)
        num_pred = len(pred_scores)
        if "bbox" in self.iou_types and pred_boxes is None and num_pred:
            raise ValueError("bbox evaluation needs pred_boxes")
        if "segm" in self.iou_types and pred_masks is None and num_pred:
            raise ValueError("segm evaluation needs pred_masks")
        scores = pred_scores.detach().float().cpu().tolist()
        boxes = _xyxy_to_xywh(pred_boxes) if pred_boxes is not None else [None] * num_pred
        rles = encode_masks(pred_masks) if pred_masks is not None else [None] * num_pred
        for score, box, rle in zip(scores, boxes, rles, strict=True):
            det: dict[str, Any] = {"image_id": image_id, "category_id": category_id, "score": score}
            if box is not None:
                det["bbox"] = box
            if rle is not None:
                det["segmentation"] = rle
            self.dets.append(det)

        num_gt = 0 if gt_boxes is None else len(gt_boxes)
        if num_gt == 0:
            return
        gt_xywh = _xyxy_to_xywh(gt_boxes)
        has_mask = (
            gt_has_mask.bool().cpu().tolist() if gt_has_mask is not None else [gt_masks is not None] * num_gt
        )
        gt_rles = encode_masks(gt_masks) if gt_masks is not None else [None] * num_gt
        for box, rle, has in zip(gt_xywh, gt_rles, has_mask, strict=True):
            self.gts.append(
                {"image_id": image_id, "category_id": category_id, "bbox": box, "rle": rle if has else None}
            )

    def all_gather(self) -> None:
        """Merge the pairs seen by every DDP process into each process (no-op outside torch.distributed)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        states: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(states, (self.images, self.categories, self.gts, self.dets))
        self.reset()
        for images, categories, gts, dets in states:
            self.images.update(images)
            self.categories.update(categories)
            self.gts.extend(gts)
            self.dets.extend(dets)

    def results(self) -> list[dict[str, Any]]:
        """Detections in COCO results format (``bbox`` xywh pixels, ``segmentation`` RLE with str counts), as
        given (COCOeval keeps the top ``max_dets`` of each (image, category) itself)."""
        return list(self.dets)

    def _gt_coco(self, iou_type: str) -> COCO:
        height_width = self.images
        anns = []
        for i, gt in enumerate(self.gts, start=1):
            x, y, w, h = gt["bbox"]
            ann = {"id": i, "image_id": gt["image_id"], "category_id": gt["category_id"], "bbox": gt["bbox"]}
            if iou_type == "segm" and gt["rle"] is None:  # box-only: a crowd region shaped as its box
                hh, ww = height_width[gt["image_id"]]
                poly = [[x, y, x + w, y, x + w, y + h, x, y + h]]
                ann["segmentation"] = mask_utils.merge(mask_utils.frPyObjects(poly, hh, ww))
                ann["iscrowd"] = 1
            else:
                ann["segmentation"] = gt["rle"] if gt["rle"] is not None else []
                ann["iscrowd"] = 0
            ann["area"] = float(mask_utils.area(gt["rle"])) if gt["rle"] is not None else float(w * h)
            anns.append(ann)
        dataset = {
            "images": [{"id": i, "height": hw[0], "width": hw[1]} for i, hw in self.images.items()],
            "categories": [{"id": c, "name": str(c)} for c in sorted(self.categories)],
            "annotations": anns,
        }
        coco = COCO()
        coco.dataset = dataset
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
        return coco

    def _evaluate(self, iou_type: str, dets: list[dict[str, Any]]) -> list[float]:
        """[AP, AP50, AP75] for one iou type; -1 where COCO has no GT, 0 with GT but no detections."""
        if not self.gts:
            return [-1.0, -1.0, -1.0]
        key = "segmentation" if iou_type == "segm" else "bbox"
        res = [{k: d[k] for k in ("image_id", "category_id", "score", key)} for d in dets]
        if not res:
            return [0.0, 0.0, 0.0]
        coco_gt = self._gt_coco(iou_type)
        with contextlib.redirect_stdout(io.StringIO()):
            coco_dt = coco_gt.loadRes(res)
            ev = COCOeval(coco_gt, coco_dt, iou_type)
            ev.params.maxDets = [1, 10, self.max_dets]
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        return [float(s) for s in ev.stats[:3]]

    def compute(self) -> dict[str, float]:
        """``{"segm_AP", "segm_AP50", "segm_AP75", "bbox_AP", ...}`` in [0, 1] (per requested iou type)."""
        dets = self.results()
        out: dict[str, float] = {}
        for iou_type in self.iou_types:
            ap, ap50, ap75 = self._evaluate(iou_type, dets)
            out.update({f"{iou_type}_AP": ap, f"{iou_type}_AP50": ap50, f"{iou_type}_AP75": ap75})
        return out
