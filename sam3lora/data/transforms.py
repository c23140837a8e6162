"""Albumentations pipelines from config: resize to the model's square input, augment, normalise.

Config (``train_transforms`` / ``val_transforms``), every key optional::

    resize: stretch | letterbox | random_square   # default stretch
    scale_range: [480, 992]   # random_square only: pixels, or fractions of image_size when all <= 1
    scale_step: 32            # random_square only: candidate sizes range(min, max + 1, step)
    augment:                  # training only: albumentations transforms as Hydra `_target_` dicts
      - {_target_: albumentations.HorizontalFlip, p: 0.5}

``stretch`` resizes to S x S ignoring aspect (as ``Sam3Processor``); ``letterbox`` keeps aspect and
zero-pads bottom/right to S; ``random_square`` (SAM 3's training recipe) resizes to s x s, s drawn from
the candidates, then zero-pads to S at a random position. Validation is resize only and never random.

Masks and boxes move together: a masked instance's box is recomputed from its transformed mask; a
box-only instance's box goes through ``A.BboxParams``; an instance whose mask becomes empty or whose box
is dropped is removed. Normalisation (the processor's rescale factor, mean and std) comes last.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch

from sam3lora.data.readers import Instance

RESIZE_MODES: tuple[str, ...] = ("stretch", "letterbox", "random_square")
_KEYS = {"resize", "scale_range", "scale_step", "augment"}


@dataclass
class TransformedImage:
    """One image after the pipeline (S = image_size, n = instances kept).

    ``pixel_values`` float32 (3, S, S) normalised; ``masks`` bool (n, S, S) (all False when box-only);
    ``has_mask`` bool (n,); ``boxes`` float32 (n, 4) normalised xyxy; ``category_ids`` int64 (n,);
    ``kept`` int64 (n,) index of each kept instance in the input list.
    """

    pixel_values: torch.Tensor
    masks: torch.Tensor
    has_mask: torch.Tensor
    boxes: torch.Tensor
    category_ids: np.ndarray
    kept: np.ndarray


def square_sizes(scale_range: Sequence[float], step: int, image_size: int) -> list[int]:
    """Candidate sizes of ``random_square``: ``range(lo, hi + 1, step)`` in pixels, each <= image_size.

    ``scale_range`` is ``[min, max]`` in pixels, or in fractions of ``image_size`` when both are <= 1.
    """
    if len(scale_range) != 2:
        raise ValueError(f"scale_range must be [min, max], got {list(scale_range)}")
    lo, hi = (float(v) for v in scale_range)
    if max(lo, hi) <= 1.0:
        lo, hi = lo * image_size, hi * image_size
    lo_px, hi_px = round(lo), round(hi)
    if not 0 < lo_px <= hi_px <= image_size:
        raise ValueError(
            f"scale_range {list(scale_range)} gives [{lo_px}, {hi_px}] px: need 0 < min <= max <= image_size "
            f"({image_size})"
        )
    if step < 1:
        raise ValueError(f"scale_step must be >= 1, got {step}")
    return list(range(lo_px, hi_px + 1, step))


def content_fraction(orig_hw: tuple[int, int], resize: str) -> tuple[float, float]:
    """Fraction (fy, fx) of the S x S input that holds the image after a validation resize.

    ``stretch``: (1, 1); ``letterbox``: (h, w) / max(h, w), image at the top-left. A normalised input
    coordinate ``(x, y)`` maps to original pixels ``(x / fx * w, y / fy * h)``.
    """
    h, w = orig_hw
    if resize == "stretch":
        return 1.0, 1.0
    if resize == "letterbox":
        m = max(h, w)
        return h / m, w / m
    raise ValueError(f"content_fraction: resize must be stretch or letterbox, got {resize!r}")


def _augment_list(items: Sequence[Any] | None) -> list[A.BasicTransform | A.BaseCompose]:
    """Instantiate ``_target_`` dicts (already-built albumentations objects pass through)."""
    from hydra.utils import instantiate

    built: list[A.BasicTransform | A.BaseCompose] = []
    for i, item in enumerate(items or []):
        if isinstance(item, Mapping):
            if "_target_" not in item:
                raise ValueError(f"augment[{i}] must have a '_target_' (e.g. albumentations.HorizontalFlip)")
            obj = instantiate(item)
        else:
            obj = item
        if not isinstance(obj, A.BasicTransform | A.BaseCompose):
            raise TypeError(f"augment[{i}] built a {type(obj).__name__}, not an albumentations transform")
        built.append(obj)
    return built


def _resize_ops(cfg: Mapping[str, Any], image_size: int, train: bool) -> list[A.BasicTransform | A.BaseCompose]:
    mode = cfg["resize"]
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {mode!r}")
    pad = dict(border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0)
    if mode == "stretch":
        return [A.Resize(image_size, image_size, interpolation=cv2.INTER_LINEAR)]
    if mode == "letterbox":
        return [
            A.LongestMaxSize(max_size=image_size, interpolation=cv2.INTER_LINEAR),
            A.PadIfNeeded(image_size, image_size, position="top_left", **pad),
        ]
    if not train:
        raise ValueError("resize: random_square is a training augmentation; validation takes stretch or letterbox")
    missing = [k for k in ("scale_range", "scale_step") if k not in cfg]
    if missing:
        raise ValueError(f"resize: random_square needs {missing} (conf/data/_common.yaml has the official values)")
    sizes = square_sizes(cfg["scale_range"], int(cfg["scale_step"]), image_size)
    return [
        A.OneOf([A.Resize(s, s, interpolation=cv2.INTER_LINEAR, p=1.0) for s in sizes], p=1.0),
        A.PadIfNeeded(image_size, image_size, position="random", **pad),
    ]


class Sam3Transform:
    """Callable ``(image, instances, seed) -> TransformedImage`` wrapping one ``A.Compose``.

    Args:
        ops: albumentations ops (resize first) applied to image, masks and box-only boxes; they must keep
            the image uint8 and end at S x S (both checked).
        image_size: S, the square output size.
        mean, std: per-channel normalisation after scaling by ``rescale_factor``.
    """

    def __init__(
        self,
        ops: Sequence[A.BasicTransform | A.BaseCompose],
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        rescale_factor: float = 1 / 255,
    ) -> None:
        self.image_size = image_size
        self.pipeline = A.Compose(
            list(ops),
            bbox_params=A.BboxParams(
                format="coco", label_fields=["instance_ids"], clip=True, filter_invalid_bboxes=True, min_area=1.0
            ),
        )
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.rescale_factor = float(rescale_factor)

    def __call__(self, image: np.ndarray, instances: Sequence[Instance], seed: int | None = None) -> TransformedImage:
        """Transform ``image`` (H, W, 3) uint8 and its ``instances``; ``seed`` fixes the random ops."""
        if seed is not None:
            self.pipeline.set_random_seed(seed)
        h, w = image.shape[:2]
        with_mask = [i for i, inst in enumerate(instances) if inst.mask is not None]
        box_only = [i for i, inst in enumerate(instances) if inst.mask is None]
        masks = np.zeros((len(with_mask), h, w), np.uint8)
        for j, i in enumerate(with_mask):
            masks[j] = instances[i].mask
        bboxes = np.array([instances[i].bbox for i in box_only], np.float32).reshape(-1, 4)
        data: dict[str, Any] = {"image": image, "bboxes": bboxes, "instance_ids": np.array(box_only, np.int64)}
        if len(with_mask):  # albumentations cannot stack an empty mask list
            data["masks"] = masks
        out = self.pipeline(**data)
        img = out["image"]
        s = self.image_size
        if img.shape[:2] != (s, s):
            raise ValueError(f"transforms produced a {img.shape[1]}x{img.shape[0]} image, expected {s}x{s}: "
                             "an augment op changed the size (add a resize/pad after it)")
        if img.dtype != np.uint8:
            raise ValueError(f"transforms produced a {img.dtype} image: augment ops must keep uint8 "
                             "(normalisation with the processor's mean/std comes after them)")

        kept: list[int] = []
        out_masks: list[np.ndarray] = []
        out_boxes: list[np.ndarray] = []
        for j, mask in enumerate(np.asarray(out.get("masks", masks)).reshape(-1, s, s) > 0):
            ys, xs = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
            if len(ys) == 0:
                continue
            kept.append(with_mask[j])
            out_masks.append(mask)
            out_boxes.append(np.array([xs[0], ys[0], xs[-1] + 1, ys[-1] + 1], np.float32))
        empty = np.zeros((s, s), bool)
        for (x, y, bw, bh), i in zip(np.asarray(out["bboxes"]).reshape(-1, 4), out["instance_ids"], strict=True):
            kept.append(int(i))
            out_masks.append(empty)
            out_boxes.append(np.clip(np.array([x, y, x + bw, y + bh], np.float32), 0, s))
        order = np.argsort(np.array(kept, np.int64), kind="stable")
        kept_arr = np.array(kept, np.int64)[order]
        n = len(kept_arr)
        boxes = torch.from_numpy(np.stack(out_boxes)[order] / s if n else np.zeros((0, 4), np.float32)).float()
        mask_t = torch.from_numpy(np.stack(out_masks)[order] if n else np.zeros((0, s, s), bool))

        pixels = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float() * self.rescale_factor
        return TransformedImage(
            pixel_values=(pixels - self.mean) / self.std,
            masks=mask_t,
            has_mask=torch.tensor([instances[i].mask is not None for i in kept_arr], dtype=torch.bool),
            boxes=boxes,
            category_ids=np.array([instances[i].category_id for i in kept_arr], np.int64),
            kept=kept_arr,
        )


def build_transform(
    cfg: Mapping[str, Any] | None,
    *,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    rescale_factor: float = 1 / 255,
    train: bool,
) -> Sam3Transform:
    """Build the train (resize + augment) or validation (resize only) pipeline from a config mapping."""
    cfg = dict(cfg or {})
    unknown = set(cfg) - _KEYS
    if unknown:
        raise ValueError(f"unknown transform key(s) {sorted(unknown)}; known: {sorted(_KEYS)}")
    if "resize" not in cfg:
        raise ValueError(f"transforms need 'resize' (one of {RESIZE_MODES}), got keys {sorted(cfg)}")
    if not train:
        extra = sorted(k for k in ("scale_range", "scale_step") if k in cfg)
        if cfg.get("augment") or extra:
            raise ValueError(f"val_transforms takes only 'resize' (validation is resize only), got {sorted(cfg)}")
    elif cfg["resize"] != "random_square":
        extra = sorted(k for k in ("scale_range", "scale_step") if k in cfg)
        if extra:
            raise ValueError(f"{extra} only apply to resize: random_square (resize is {cfg['resize']})")
    ops = _resize_ops(cfg, image_size, train) + (_augment_list(cfg.get("augment")) if train else [])
    return Sam3Transform(ops, image_size, mean, std, rescale_factor)
