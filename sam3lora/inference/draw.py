"""Overlay pictures of predictions: masks tinted per prompt, boxes outlined, ``prompt score`` labels."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from sam3lora.inference.predictor import PromptResult

PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128),
)


def colour(index: int) -> tuple[int, int, int]:
    """Colour of the ``index``-th prompt."""
    return PALETTE[index % len(PALETTE)]


def overlay(image: Image.Image, results: Sequence[PromptResult], alpha: float = 0.45) -> Image.Image:
    """``image`` with each result's masks blended in its prompt's colour, boxes outlined and labelled.

    Args:
        image: RGB image of size (W, H) matching the results' masks (N, H, W).
        results: one ``PromptResult`` per prompt (colours follow their order).
    Returns a new RGB image; ``image`` is not modified.
    """
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32).copy()
    for i, result in enumerate(results):
        tint = np.array(colour(i), dtype=np.float32)
        for mask in result.masks.numpy():
            if mask.shape != pixels.shape[:2]:
                raise ValueError(f"mask of size {mask.shape} does not fit an image of size {pixels.shape[:2]}")
            pixels[mask] = (1 - alpha) * pixels[mask] + alpha * tint
    out = Image.fromarray(pixels.round().clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    for i, result in enumerate(results):
        for box, score in zip(result.boxes.tolist(), result.scores.tolist(), strict=True):
            draw.rectangle(box, outline=colour(i), width=2)
            draw.text((box[0] + 2, box[1] + 1), f"{result.prompt} {score:.2f}", fill=colour(i))
    return out
