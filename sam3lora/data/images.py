"""The one image decoder of every reader (training and validation data, prediction, evaluation, the demo).

:func:`decode_image` decodes the whole file (Pillow's ``load()``, which raises on a truncated file unless a caller
has set ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES``), keeps the stored pixel order (EXIF orientation is not applied:
annotations refer to the stored pixels) and converts every mode to RGB uint8 with :func:`to_rgb8`, scaling
16-bit and 32-bit images into 0..255 instead of clipping them to white. The array is new and writable (numpy can
only wrap Pillow's ``tobytes()`` read-only, which torch warns about): Pillow's raw encoder writes straight into it,
so it costs no copy more than ``np.asarray(image)``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from sam3lora.data.data_error import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")  # what the tools take for an image
_WIDE = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")  # one channel wider than 8 bits


class ImageDecodeError(DataError):
    """An image file is missing or cannot be decoded whole: ``"<file>: <problem>"``."""


def _rgb_array(image: Image.Image) -> np.ndarray:
    """An RGB Pillow image -> a new writable uint8 ``(H, W, 3)`` array.

    Does what ``Image.tobytes()`` does (the raw encoder, chunk by chunk) but copies each chunk into the array
    instead of joining the chunks into an immutable ``bytes``; falls back to ``np.array`` (one copy more) if
    Pillow's encoder interface is not the one expected.
    """
    width, height = image.size
    out = np.empty((height, width, 3), np.uint8)
    if out.size == 0:
        return out
    flat = out.reshape(-1)
    try:
        image.load()
        encoder = Image._getencoder(image.mode, "raw", image.mode)  # what tobytes() uses
        encoder.setimage(image.im)
        bufsize = max(ImageFile.MAXBLOCK, width * 4)
        filled = 0
        while True:
            _, status, chunk = encoder.encode(bufsize)
            flat[filled:filled + len(chunk)] = np.frombuffer(chunk, np.uint8)
            filled += len(chunk)
            if status:
                break
        if status < 0 or filled != flat.size:
            raise ValueError(f"raw encoder returned {filled} of {flat.size} bytes (status {status})")
    except (AttributeError, TypeError, ValueError):
        return np.array(image, dtype=np.uint8)
    return out


def to_rgb8(image: Image.Image) -> np.ndarray:
    """Any Pillow image -> RGB uint8 ``(H, W, 3)``.

    16-bit modes (``I;16*``) map 0..65535 onto 0..255; ``I`` (32-bit integers, how Pillow opens many 16-bit
    files) and ``F`` (floats) are taken as 16-bit data (clipped to 0..65535, then scaled) unless every value
    already lies in 0..255 (8-bit data stored wide), and ``F`` images whose values lie in 0..1 are scaled by 255.
    Other modes (L, P, RGBA, CMYK, 1, ...) go through Pillow's ``convert("RGB")``. The result is always a new,
    writable array.
    """
    if image.mode not in _WIDE:
        return _rgb_array(image if image.mode == "RGB" else image.convert("RGB"))
    values = np.asarray(image).astype(np.float64)
    if image.mode == "F" and values.size and np.nanmin(values) >= 0 and np.nanmax(values) <= 1:
        gray = values * 255.0
    elif image.mode in ("I", "F") and values.size and np.nanmin(values) >= 0 and np.nanmax(values) <= 255:
        gray = values
    else:
        gray = np.clip(values, 0, 65535) * (255.0 / 65535.0)
    gray = np.nan_to_num(np.rint(gray), nan=0.0).astype(np.uint8)
    return np.repeat(gray[:, :, None], 3, axis=2)


def decode_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Decode the whole image file at ``path`` into RGB uint8 ``(H, W, 3)``.

    Raises :class:`ImageDecodeError` naming the file when it is missing, not an image, truncated or otherwise
    undecodable, or too large for Pillow's decompression-bomb limit.
    """
    p = Path(path)
    if not p.is_file():
        raise ImageDecodeError(p, "image file not found")
    try:
        with Image.open(p) as image:
            image.load()
            return to_rgb8(image)
    except Image.DecompressionBombError as err:
        raise ImageDecodeError(p, f"image has too many pixels to decode safely ({err})") from None
    except UnidentifiedImageError:
        raise ImageDecodeError(p, "cannot decode image file (not an image Pillow can read)") from None
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        problem = " ".join(str(err).split())
        if "truncated" in problem.lower():
            known = problem.startswith("image file is truncated")
            raise ImageDecodeError(p, problem if known else f"image file is truncated ({problem})") from None
        raise ImageDecodeError(p, f"cannot decode image file ({problem})") from None
