"""Evaluate a predictor on a COCO split with SAM 3's protocol, at the original image resolution.

Every category is queried on every image (absent ones are negative prompts), with its first phrasing as the
text. Per (image, category) pair the predictor's Q queries are scored as SAM 3 does; the candidates (the top
``max_detections`` by score plus every query >= ``score_threshold``) are upsampled to the image size once and fed to
the accumulators of ``sam3lora.metrics``: matched-instance IoU / Dice and cgF1 (IL_MCC, pmF1) count predictions
>= ``score_threshold``; COCO box and mask AP take the top ``max_detections`` per (image, category) pair, which is
pycocotools' own maxDets rule, evaluated by pycocotools on exactly the detections that are written out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from sam3lora.data.readers import DatasetReader, ImageRecord, Instance
from sam3lora.inference.errors import PredictorError
from sam3lora.inference.predictor import Prompt, Sam3LoRAPredictor
from sam3lora.metrics import CgF1Accumulator, CocoApAccumulator, MatchedIoUDice

METRIC_KEYS = (
    "iou", "dice", "bbox_AP", "bbox_AP50", "bbox_AP75", "segm_AP", "segm_AP50", "segm_AP75", "cgF1", "IL_MCC",
    "pmF1",
)


@dataclass
class EvalSettings:
    """The evaluation keys of ``conf/eval.yaml`` (the one place their values are stated).

    Attributes:
    score_threshold: predictions >= this count for IoU / Dice / cgF1 (SAM 3: 0.5).
    mask_threshold: mask probability above which a pixel is foreground.
    max_detections: detections per (image, category) kept for COCO AP (pycocotools' maxDets, 100).
    batch_size: images per forward pass.
    limit: evaluate only the first N images of the split (None = all).
    """

    score_threshold: float
    mask_threshold: float
    max_detections: int
    batch_size: int
    limit: int | None

    def __post_init__(self) -> None:
        for name in ("score_threshold", "mask_threshold"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise PredictorError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("max_detections", "batch_size"):
            if getattr(self, name) < 1:
                raise PredictorError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.limit is not None and self.limit < 1:
            raise PredictorError(f"limit must be >= 1 or null, got {self.limit}")


@dataclass
class EvalResult:
    """Metrics of one model (keys ``METRIC_KEYS`` + counts) and the COCO detections AP was computed on."""

    metrics: dict[str, float]
    detections: list[dict[str, Any]]


def ground_truth(instances: list[Instance], category_id: int, size: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor]:
    """GT of one (image, category) pair: boxes (G,4) xyxy pixels float32, masks bool (G,H,W) (zeros for box-only
    instances), has_mask bool (G,)."""
    height, width = size
    chosen = [inst for inst in instances if inst.category_id == category_id]
    boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (i.bbox for i in chosen)], dtype=torch.float32)
    masks = torch.zeros(len(chosen), height, width, dtype=torch.bool)
    has_mask = torch.zeros(len(chosen), dtype=torch.bool)
    for k, inst in enumerate(chosen):
        if inst.mask is not None:
            masks[k] = torch.from_numpy(np.asarray(inst.mask, dtype=bool))
            has_mask[k] = True
    return boxes.reshape(-1, 4), masks, has_mask


def evaluate(
    predictor: Sam3LoRAPredictor,
    reader: DatasetReader,
    adapter: str | None,
    settings: EvalSettings,
    on_image: Callable[[ImageRecord], None] | None = None,
) -> EvalResult:
    """Evaluate ``predictor`` running ``adapter`` (None: the base alone) on every image of ``reader``.

    ``on_image`` is called after each image (progress bars). Unreadable images raise ``BadSampleError``.
    """
    records = list(reader.images())[: settings.limit]
    categories = dict(reader.categories())
    category_ids = list(categories)
    prompts = [Prompt(categories[c][0]) for c in category_ids]
    iou_dice = MatchedIoUDice(settings.score_threshold)
    cgf1 = CgF1Accumulator(settings.score_threshold)
    coco_ap = CocoApAccumulator(max_dets=settings.max_detections)
    for start in range(0, len(records), settings.batch_size):
        chunk = records[start : start + settings.batch_size]
        pixels = [Image.fromarray(reader.load_image(rec)) for rec in chunk]
        for out in predictor.outputs(pixels, prompts, batch_size=len(chunk), adapter=adapter):
            record = chunk[out.index]
            size = (record.height, record.width)
            instances = reader.instances(record)
            for row, category_id in zip(out.rows, category_ids, strict=True):
                gt_boxes, gt_masks, has_mask = ground_truth(instances, category_id, size)
                top = row.scores.topk(min(settings.max_detections, len(row.scores))).indices
                above = torch.nonzero(row.scores >= settings.score_threshold).flatten()
                candidates = torch.unique(torch.cat([top, above]))
                masks, boxes, scores = predictor.instances(row, size, candidates, settings.mask_threshold)
                iou_dice.update(masks, scores, gt_masks, gt_valid=has_mask)
                cgf1.update(masks, scores, gt_masks[has_mask])
                in_top = torch.isin(candidates, top).cpu()
                coco_ap.update(
                    image_id=record.id,
                    category_id=category_id,
                    image_size=size,
                    pred_scores=scores[in_top],
                    pred_boxes=boxes[in_top],
                    pred_masks=masks[in_top],
                    gt_boxes=gt_boxes,
                    gt_masks=gt_masks,
                    gt_has_mask=has_mask,
                )
            if on_image is not None:
                on_image(record)
    metrics: dict[str, float] = {}
    matched = iou_dice.compute()
    metrics.update(iou=matched["iou"], dice=matched["dice"])
    metrics.update(coco_ap.compute())
    cg = cgf1.compute()
    metrics.update(cgF1=cg["cgF1"], IL_MCC=cg["IL_MCC"], pmF1=cg["pmF1"])
    metrics.update(
        num_images=float(len(records)), num_pairs=cg["num_pairs"], num_instances=matched["num_instances"]
    )
    return EvalResult(metrics, coco_ap.results())
