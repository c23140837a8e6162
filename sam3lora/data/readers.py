"""Dataset readers: one split of a dataset on disk -> image records, per-image instances, category prompts.

:class:`DatasetReader` is the plug-in point: a reader is built as ``ReaderClass(root, split)`` (a class or
a Hydra ``_target_`` dict naming one, see :func:`build_reader`), so another annotation format needs no
edit of this package. :class:`CocoReader` reads the canonical layout of ``docs/contracts.md``::

    root/<split>/annotations.json   root/<split>/images/<file_name>

:meth:`DatasetReader.problems` lists what is wrong before training starts (for :class:`CocoReader`: every check of
``sam3lora-data validate`` except the whole decode of each image, which stays lazy); a problem met while loading
one image (an undecodable or truncated file, a malformed annotation) raises :class:`BadSampleError`. The data
module refuses or skips both alike (``on_bad_sample``).
"""

from __future__ import annotations

import contextlib
import io
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools.coco import COCO

from sam3lora.data.coco_json import check_unique_ids, read_coco, safe_relpath
from sam3lora.data.data_error import DataError
from sam3lora.data.images import ImageDecodeError, decode_image
from sam3lora.data.masks import annotation_to_mask
from sam3lora.data.validate import Issue, check_split


class BadSampleError(DataError):
    """One sample cannot be used: ``str(err)`` is ``"<file>: <problem>"`` (``path``, ``problem`` kept)."""


@dataclass(frozen=True)
class ImageRecord:
    """One image of a split: ``path`` to the file, COCO ``id``, and its size as annotated."""

    id: int
    path: Path
    width: int
    height: int


@dataclass
class Instance:
    """One object of an image, in original pixel coordinates.

    ``bbox`` is ``(x, y, w, h)``; ``mask`` is uint8/bool ``(height, width)`` or None for a box-only object.
    """

    category_id: int
    bbox: tuple[float, float, float, float]
    mask: np.ndarray | None


class DatasetReader(ABC):
    """One split of a dataset. Subclasses take ``(root, split)`` and must be picklable (DataLoader workers).

    Contract: :meth:`images` is the fixed, ordered list of samples; :meth:`categories` maps every
    category id to one or more prompt phrasings (first = canonical); :meth:`instances` and
    :meth:`load_image` raise :class:`BadSampleError` for a broken sample and nothing else for bad data.
    """

    def __init__(self, root: str | Path, split: str) -> None:
        self.root = Path(root)
        self.split = split

    @abstractmethod
    def images(self) -> Sequence[ImageRecord]:
        """Image records of the split, in a fixed order."""

    @abstractmethod
    def categories(self) -> Mapping[int, Sequence[str]]:
        """``{category id: [prompt phrasing, ...]}`` (at least one phrasing each)."""

    @abstractmethod
    def instances(self, image: ImageRecord) -> list[Instance]:
        """Objects of ``image`` (crowd annotations excluded)."""

    def problems(self) -> Sequence[Issue]:
        """Errors found by checking the split up front (each with the image id it spoils as ``sample``, or
        ``fatal``); the data module refuses them or skips those samples. Default: none (nothing checked)."""
        return ()

    def load_image(self, image: ImageRecord) -> np.ndarray:
        """RGB uint8 ``(height, width, 3)`` decoded whole by :func:`sam3lora.data.images.decode_image` (truncated
        files are bad samples, 16-bit images are scaled); EXIF orientation ignored (annotations use stored pixels)."""
        try:
            pixels = decode_image(image.path)
        except ImageDecodeError as err:
            raise BadSampleError(err.path, err.problem) from None
        if pixels.shape[:2] != (image.height, image.width):
            raise BadSampleError(
                image.path,
                f"image is {pixels.shape[1]}x{pixels.shape[0]} (WxH) but annotated as {image.width}x{image.height}",
            )
        return pixels


class CocoReader(DatasetReader):
    """Canonical layout reader built on ``pycocotools.coco.COCO`` (the index is built once, here)."""

    def __init__(self, root: str | Path, split: str) -> None:
        super().__init__(root, split)
        self.annotation_file = self.root / split / "annotations.json"
        self.image_dir = self.root / split / "images"
        data = read_coco(self.annotation_file)  # DataError naming the file on a bad json
        check_unique_ids(data, self.annotation_file)  # pycocotools would merge two images into one
        self.coco = COCO()
        self.coco.dataset = data
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            self.coco.createIndex()
        self._prompts = self._read_prompts(data["categories"])
        self._images = [self._record(img) for img in data["images"]]
        if not self._prompts:
            raise DataError(self.annotation_file, "no categories")

    def problems(self) -> Sequence[Issue]:
        """Every error ``sam3lora-data validate`` reports for this split, except that image files are checked by
        their header (exists, decodable header, size) instead of a whole decode: :meth:`load_image` decodes each
        whole when it is used (a truncated file is a bad sample then). Cost: one header read per image."""
        errors, _, _ = check_split(
            self.split, self.coco.dataset, json_file=self.annotation_file, images="header",
            image_path=lambda im: self.image_dir / safe_relpath(im["file_name"], self.annotation_file),
        )
        return errors

    def _read_prompts(self, categories: list[dict[str, Any]]) -> dict[int, list[str]]:
        prompts: dict[int, list[str]] = {}
        for cat in categories:
            phrasings = cat.get("prompts") or [cat["name"]]
            if not isinstance(phrasings, list) or not all(isinstance(p, str) and p.strip() for p in phrasings):
                raise DataError(
                    self.annotation_file, f"category {cat['id']}: 'prompts' must be a list of non-empty strings"
                )
            prompts[int(cat["id"])] = [p.strip() for p in phrasings]
        return dict(sorted(prompts.items()))

    def _record(self, img: dict[str, Any]) -> ImageRecord:
        try:
            width, height = int(img["width"]), int(img["height"])
        except (TypeError, ValueError):
            raise DataError(self.annotation_file, f"image {img['id']}: width/height must be integers") from None
        if width <= 0 or height <= 0:
            raise DataError(self.annotation_file, f"image {img['id']}: size {width}x{height} is not positive")
        return ImageRecord(id=int(img["id"]), path=self.image_dir / str(img["file_name"]), width=width, height=height)

    def images(self) -> Sequence[ImageRecord]:
        return self._images

    def categories(self) -> Mapping[int, Sequence[str]]:
        return self._prompts

    def instances(self, image: ImageRecord) -> list[Instance]:
        out: list[Instance] = []
        for ann in self.coco.imgToAnns.get(image.id, []):
            if ann.get("iscrowd", 0):
                continue
            if ann["category_id"] not in self._prompts:
                raise BadSampleError(self.annotation_file, f"annotation {ann['id']}: unknown category id "
                                                           f"{ann['category_id']}")
            bbox = ann["bbox"]
            try:
                box = tuple(float(v) for v in bbox)
            except (TypeError, ValueError):
                box = ()
            if len(box) != 4 or not all(math.isfinite(v) for v in box):
                raise BadSampleError(self.annotation_file, f"annotation {ann['id']}: bbox {bbox!r} is not 4 numbers")
            mask = None
            if not ann.get("box_only", False):
                try:
                    mask = annotation_to_mask(ann.get("segmentation"), image.height, image.width)
                except (ValueError, TypeError, KeyError) as err:
                    raise BadSampleError(self.annotation_file, f"annotation {ann['id']}: {err}") from None
                if not mask.any():  # empty segmentation without the box_only flag: use the box
                    mask = None
            out.append(Instance(category_id=int(ann["category_id"]), bbox=box, mask=mask))  # type: ignore[arg-type]
        return out


ReaderFactory = Callable[[Path, str], DatasetReader]


def build_reader(reader: ReaderFactory | Mapping[str, Any] | None, root: str | Path, split: str) -> DatasetReader:
    """Build a reader for ``split``: ``None`` -> :class:`CocoReader`; a callable (class, partial) is called as
    ``reader(root, split)``; a mapping with ``_target_`` is instantiated by Hydra with ``root`` and ``split``.
    """
    if reader is None:
        built: Any = CocoReader(root, split)
    elif isinstance(reader, Mapping):
        if "_target_" not in reader:
            raise ValueError(f"data.reader must name a class with '_target_', got keys {sorted(reader)}")
        from hydra.errors import InstantiationException
        from hydra.utils import instantiate

        try:
            built = instantiate(reader, root=str(root), split=split)
        except InstantiationException as err:  # the reader's own DataError (names its file), not Hydra's wrapper
            if isinstance(err.__cause__, DataError):
                raise err.__cause__ from None
            raise
        if callable(built) and not isinstance(built, DatasetReader):  # `_partial_: true`
            built = built()
    elif callable(reader):
        built = reader(Path(root), split)
    else:
        raise TypeError(f"data.reader must be a class, a callable or a _target_ mapping, got {type(reader).__name__}")
    if not isinstance(built, DatasetReader):
        raise TypeError(f"data.reader built a {type(built).__name__}, not a sam3lora.data.readers.DatasetReader")
    return built
