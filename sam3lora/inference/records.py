"""Predictions as COCO: detection records (RLE mask, xywh box, score) and a results file naming its prompts."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pycocotools import mask as mask_utils
from torchvision.ops import box_convert

from sam3lora.inference.predictor import PromptResult
from sam3lora.metrics import encode_masks


def detection_records(result: PromptResult, image_id: int, category_id: int) -> list[dict[str, Any]]:
    """COCO result dicts of one prompt on one image: ``segmentation`` RLE (str counts), ``bbox`` xywh pixels,
    ``area`` (mask pixels), ``score``, ``category_id`` (the prompt's id), ``image_id``, ``iscrowd`` 0."""
    rles = encode_masks(result.masks)
    xywh = box_convert(result.boxes.reshape(-1, 4), "xyxy", "xywh").tolist()
    return [
        {
            "image_id": int(image_id),
            "category_id": int(category_id),
            "segmentation": rle,
            "bbox": [round(v, 3) for v in box],
            "area": float(mask_utils.area(rle)),
            "score": round(float(score), 6),
            "iscrowd": 0,
        }
        for rle, box, score in zip(rles, xywh, result.scores.tolist(), strict=True)
    ]


def results_document(
    images: Sequence[dict[str, Any]], prompts: Sequence[str], detections: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    """One COCO-style file: ``images``, ``categories`` (id i+1 = the i-th prompt) and ``annotations`` = the
    detections (numbered ``id`` from 1, each with its ``score``). ``pycocotools.coco.COCO`` opens it, and
    ``COCO.loadRes(doc["annotations"])`` takes its detections."""
    return {
        "info": {"description": "sam3lora-predict detections"},
        "images": list(images),
        "categories": [{"id": i + 1, "name": p} for i, p in enumerate(prompts)],
        "annotations": [{"id": i + 1, **det} for i, det in enumerate(detections)],
    }


def write_json(path: Path, data: Any) -> Path:
    """Write ``data`` as JSON (used inside an ``atomic_dir``, which makes the whole folder appear at once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path
