"""Images in: PIL images, paths or arrays -> RGB PIL images; image lists from a file, a folder or a glob."""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image

from sam3lora.data.images import IMAGE_EXTENSIONS, ImageDecodeError, decode_image, to_rgb8
from sam3lora.inference.errors import ImageReadError, PredictorError

ImageInput = Union[Image.Image, str, os.PathLike, np.ndarray]  # noqa: UP007 (used at run time)


def image_name(image: ImageInput, index: int) -> str:
    """A name for messages: the path, or ``<image N>`` for in-memory images."""
    return str(image) if isinstance(image, (str, os.PathLike)) else f"<image {index}>"


def read_image(path: str | os.PathLike[str]) -> Image.Image:
    """Decode an image file into an RGB PIL image (stored pixel order; EXIF orientation is not applied, as the
    dataset readers do, so masks line up with the pixels annotations refer to).

    Raises ``ImageReadError`` naming the file when it is missing or cannot be decoded.
    """
    try:
        return Image.fromarray(decode_image(path), "RGB")  # the training readers' decoder: truncation, 16 bit
    except ImageDecodeError as err:
        raise ImageReadError(err.path, err.problem) from None


def to_pil(image: ImageInput, index: int = 0) -> Image.Image:
    """PIL image, path or uint8 array (H,W,3) / (H,W) -> RGB PIL image."""
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else Image.fromarray(to_rgb8(image), "RGB")  # 16 bit scaled, not clipped
    if isinstance(image, (str, os.PathLike)):
        return read_image(image)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
            raise PredictorError(
                f"{image_name(image, index)}: arrays must be uint8 (H,W), (H,W,3) or (H,W,4), "
                f"got {image.dtype} {image.shape}"
            )
        return Image.fromarray(image).convert("RGB")
    raise PredictorError(f"{image_name(image, index)}: expected a PIL image, a path or an array, got {type(image)}")


def find_images(sources: Sequence[str]) -> list[Path]:
    """Image files named by ``sources``: files, folders (their image files, sorted, not recursive) or globs.

    A file named explicitly is kept whatever its extension (reading it reports a problem later); in folders and
    globs only files with an image extension count. Raises ``PredictorError`` for a source that matches nothing.
    """
    found: list[Path] = []
    for source in sources:
        p = Path(source)
        if p.is_file():
            found.append(p)
        elif p.is_dir():
            files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
            if not files:
                raise PredictorError(f"{source}: folder holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
            found.extend(files)
        elif glob.has_magic(source):
            files = sorted(
                Path(f) for f in glob.glob(source, recursive=True)
                if Path(f).is_file() and Path(f).suffix.lower() in IMAGE_EXTENSIONS
            )
            if not files:
                raise PredictorError(f"{source}: pattern matches no image files")
            found.extend(files)
        else:
            raise PredictorError(f"{source}: no such file or folder")
    unique = list(dict.fromkeys(found))
    return unique
