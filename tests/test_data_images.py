"""Tests for sam3lora.data.images: decoded arrays are new and writable (no torch warning downstream)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sam3lora.data.images import decode_image, to_rgb8
from sam3lora.data.transforms import build_transform


@pytest.mark.parametrize("mode", ["RGB", "L", "P", "RGBA", "CMYK", "1", "I;16"])
def test_decoded_pixels_are_writable_and_exact(tmp_path: Path, mode: str) -> None:
    rng = np.random.default_rng(0)
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65535, (21, 34), dtype=np.uint16))
    else:
        image = Image.fromarray(rng.integers(0, 255, (21, 34, 3), dtype=np.uint8)).convert(mode)
    path = tmp_path / ("x.tif" if mode in ("CMYK", "I;16") else "x.png")
    image.save(path)
    pixels = decode_image(path)
    assert pixels.shape == (21, 34, 3) and pixels.dtype == np.uint8
    assert pixels.flags.writeable and pixels.flags.c_contiguous
    with Image.open(path) as again:
        again.load()
        assert np.array_equal(pixels, to_rgb8(again))
        if mode != "I;16":
            assert np.array_equal(pixels, np.asarray(again.convert("RGB")))
    pixels[0, 0] = 7  # writable for real, and memory of its own
    assert not np.shares_memory(pixels, decode_image(path))


def test_empty_image_decodes_to_an_empty_writable_array() -> None:
    out = to_rgb8(Image.new("RGB", (0, 5)))
    assert out.shape == (5, 0, 3) and out.flags.writeable


def test_validation_transform_of_a_decoded_image_warns_nothing(tmp_path: Path) -> None:
    """The resize-only pipeline at the model's size used to hand Pillow's read-only array to torch.from_numpy
    ("The given NumPy array is not writable")."""
    path = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    transform = build_transform({"resize": "stretch"}, train=False, image_size=64, mean=[0.5] * 3, std=[0.5] * 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = transform(decode_image(path), [], seed=0)
    assert tuple(out.pixel_values.shape) == (3, 64, 64)
