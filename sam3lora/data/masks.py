"""COCO segmentations <-> masks via pycocotools: polygons and RLE (compressed or not) decode to bool masks,
masks encode to polygons that rasterise back to the same pixels.

Segmentations are kept as they come: polygons stay polygons and RLE stays RLE, so masks are bit-identical to the
source; every reader decodes them with :func:`annotation_to_mask`.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
from pycocotools import mask as mask_utils


def segmentation_to_rle(segmentation: Any, height: int, width: int) -> dict[str, Any] | None:
    """COCO ``segmentation`` (polygon list, compressed or uncompressed RLE) -> compressed RLE dict.

    Returns None for an empty segmentation (``[]``, box-only annotations). Raises ValueError on a
    malformed one (callers add the file name).
    """
    if segmentation is None or (isinstance(segmentation, list) and len(segmentation) == 0):
        return None
    if isinstance(segmentation, list):
        polys = [list(map(float, p)) for p in segmentation]
        for p in polys:
            if len(p) < 6 or len(p) % 2:
                raise ValueError(f"polygon with {len(p)} coordinates (need an even number >= 6)")
        return mask_utils.merge(mask_utils.frPyObjects(polys, height, width))
    if isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        h, w = (int(v) for v in segmentation["size"])
        if (h, w) != (height, width):
            raise ValueError(f"RLE size {[h, w]} differs from the image size {[height, width]}")
        counts = segmentation["counts"]
        if isinstance(counts, list):
            if sum(counts) != h * w:
                raise ValueError(f"uncompressed RLE counts sum to {sum(counts)}, expected {h * w}")
            return mask_utils.frPyObjects(segmentation, h, w)
        if isinstance(counts, str | bytes):
            return {"size": [h, w], "counts": counts.encode() if isinstance(counts, str) else counts}
    raise ValueError("segmentation must be a polygon list or an RLE dict with 'size' and 'counts'")


def annotation_to_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """Decode a COCO ``segmentation`` to a bool mask (height, width); all False when empty."""
    rle = segmentation_to_rle(segmentation, height, width)
    if rle is None:
        return np.zeros((height, width), dtype=bool)
    return mask_utils.decode(rle).astype(bool)


def _slit_holes(mask: np.ndarray) -> np.ndarray:
    """Cut a 1 px column from each hole up to the outside so the mask has no holes (polygons can't)."""
    mask = mask.copy()
    for _ in range(64):
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        filled = np.zeros_like(mask)
        cv2.drawContours(filled, contours, -1, 1, thickness=cv2.FILLED)
        holes = (filled > 0) & (mask == 0)
        if not holes.any():
            break
        n, labels = cv2.connectedComponents(holes.astype(np.uint8), connectivity=4)
        for k in range(1, n):
            ys, xs = np.nonzero(labels == k)
            y, x = int(ys[0]), int(xs[0])  # topmost hole pixel (row-major order)
            zeros_above = np.flatnonzero(mask[:y, x] == 0)
            top = int(zeros_above[-1]) + 1 if zeros_above.size else 0
            mask[top:y, x] = 0
    return mask


def mask_to_polygons(mask: np.ndarray, min_points: int = 3) -> list[list[float]]:
    """Bool/uint8 mask (H, W) -> COCO polygons (pixel-edge coordinates) that rasterise back to it.

    Contours are traced on a 2x nearest-upsampled mask, which puts vertices on pixel corners, so
    pycocotools rasterises the polygon to the same pixels. Holes are slit open (a 1 px cut) first,
    since COCO polygons cannot hold holes. Fragments with fewer than ``min_points`` vertices are dropped.
    """
    m = _slit_holes(np.ascontiguousarray(mask, dtype=np.uint8))
    up = cv2.resize(m, None, fx=2, fy=2, interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(up, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polys: list[list[float]] = []
    for c in contours:
        pts = c.reshape(-1, 2)
        if len(pts) < min_points:
            continue
        polys.append([round(float(v) / 2.0, 2) for v in pts.ravel()])
    return polys


def rle_area_bbox(rle: dict[str, Any]) -> tuple[float, list[float]]:
    """Area (pixels) and bbox ``[x, y, w, h]`` of a compressed RLE."""
    return float(mask_utils.area(rle)), [float(v) for v in mask_utils.toBbox(rle)]


def ensure_str_counts(rle: dict[str, Any]) -> dict[str, Any]:
    """Compressed RLE with ``counts`` as str (json-serialisable)."""
    counts = rle["counts"]
    text = counts.decode() if isinstance(counts, bytes) else counts
    return {"size": [int(v) for v in rle["size"]], "counts": text}
