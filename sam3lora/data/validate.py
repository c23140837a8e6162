"""``sam3lora-data validate``: check a dataset in any layout ``convert`` reads, and the checks behind it.

Layouts (``sam3lora.data.validate_dataset.find_sources``): the converted one (``SPLIT/annotations.json`` +
``SPLIT/images/``), Roboflow COCO
(``SPLIT/_annotations.coco.json`` beside the images, ``valid`` -> ``val``), classic COCO
(``annotations/instances_SPLIT.json`` + ``SPLIT/`` or ``images/SPLIT/``) and YOLO detect/segment (``data.yaml``).

:func:`check_split` is the one set of checks, run by ``validate``, by both converters before they write anything
and (with ``images="header"``) when a dataset is opened for training. Errors: missing or undecodable image (a
truncated file too), image size differing from the annotations, degenerate polygon (< 3 points or zero area) or
box (w or h <= 0), polygon/box outside the image (beyond ``TOLERANCE`` px), bad RLE, unknown category id,
duplicate image/annotation/category ids, annotation naming a missing image id, an unreadable json; for YOLO also
malformed label lines and label files with no image. Warnings: category with no instances in a split, images
with no annotation, box-only annotations, a missing train or val split.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from sam3lora.data.coco_json import read_coco, safe_relpath
from sam3lora.data.data_error import DataError
from sam3lora.data.images import ImageDecodeError, decode_image
from sam3lora.data.layouts import find_coco_splits
from sam3lora.data.masks import segmentation_to_rle

TOLERANCE = 1.0
SPLITS = ("train", "val", "test")
ImageCheck = Literal["exists", "header", "decode"]


@dataclass(frozen=True)
class Issue:
    """One problem: where (split, file, id of the image/annotation/category) and what.

    ``sample`` is the image id whose sample the problem makes unusable (None when it is tied to no image);
    ``fatal`` marks a problem that makes the whole split unusable (unreadable json, duplicate image or category ids).
    """

    split: str
    file: str
    id: int | str | None
    message: str
    sample: int | None = None
    fatal: bool = False

    def located(self) -> str:
        """``"<file> [id N]: <message>"``."""
        where = self.file + (f" [id {self.id}]" if self.id is not None else "")
        return f"{where}: {self.message}"

    def __str__(self) -> str:
        return f"{self.split}: {self.located()}"


class DatasetProblems(DataError):
    """Data refused because of ``issues`` (every problem found); ``summary`` is the one-line verdict.

    ``str(err)`` is ``"<path>: <summary>: <first issues>; ..."`` (one line); :meth:`lines` gives one line per issue.
    """

    def __init__(self, path: str | Path, issues: Sequence[Issue], summary: str, shown: int = 20) -> None:
        self.issues = list(issues)
        self.summary = summary
        listing = "; ".join(i.located() for i in self.issues[:shown])
        more = f"; ... and {len(self.issues) - shown} more" if len(self.issues) > shown else ""
        super().__init__(path, f"{summary}: {listing}{more}")

    def lines(self) -> list[str]:
        """One line per issue: ``"<split>: <file> [id N]: <message>"``."""
        return [str(i) for i in self.issues]


@dataclass
class SplitCounts:
    """Counts for one split; ``per_category`` maps category name -> instances (crowd excluded)."""

    images: int = 0
    instances: int = 0
    crowd: int = 0
    box_only: int = 0
    images_without_annotations: int = 0
    per_category: dict[str, int] = field(default_factory=dict)


@dataclass
class Report:
    """Validation result: ``errors`` and ``warnings`` (:class:`Issue`), ``counts`` per split, the ``layout`` read."""

    root: Path
    errors: list[Issue] = field(default_factory=list)
    warnings: list[Issue] = field(default_factory=list)
    counts: dict[str, SplitCounts] = field(default_factory=dict)
    layout: str = ""

    @property
    def ok(self) -> bool:
        return not self.errors


@dataclass
class SplitSource:
    """One split as read from disk, before any check: a COCO dict (None when it could not be read) and where its
    parts live. ``image_path`` maps an image entry to its file; ``ann_files`` names the file (``label.txt:line``
    for YOLO) of an annotation id when it is not ``json_file``; ``issues`` are problems met while reading."""

    split: str
    json_file: Path
    data: dict[str, Any] | None
    image_path: Callable[[Mapping[str, Any]], Path]
    check_size: bool = True
    ann_files: dict[Any, str] = field(default_factory=dict)
    issues: list[Issue] = field(default_factory=list)


# --------------------------------------------------------------------------------------------- geometry


def _polygon_area(coords: list[float]) -> float:
    xy = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    x, y = xy[:, 0], xy[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _check_geometry(ann: Mapping[str, Any], width: int, height: int) -> list[str]:
    """Error messages for one annotation's bbox and segmentation."""
    problems: list[str] = []
    bbox = ann.get("bbox")
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, int | float) for v in bbox)
            and all(np.isfinite(bbox))):
        return [f"bbox must be 4 numbers [x, y, w, h], got {bbox!r}"]
    x, y, w, h = bbox
    if w <= 0 or h <= 0:
        problems.append(f"degenerate box {bbox} (w and h must be > 0)")
    elif x < -TOLERANCE or y < -TOLERANCE or x + w > width + TOLERANCE or y + h > height + TOLERANCE:
        problems.append(f"box {bbox} outside the {width}x{height} image")
    seg = ann.get("segmentation")
    if isinstance(seg, list):
        for k, poly in enumerate(seg):
            if not isinstance(poly, list) or not all(isinstance(v, int | float) for v in poly):
                problems.append(f"polygon {k} is not a list of numbers")
                continue
            if len(poly) < 6 or len(poly) % 2:
                problems.append(f"degenerate polygon {k}: {len(poly)} coordinates (need >= 3 points)")
                continue
            if _polygon_area(poly) <= 0:
                problems.append(f"degenerate polygon {k}: zero area")
            xy = np.asarray(poly, dtype=np.float64).reshape(-1, 2)
            if (xy.min(axis=0) < -TOLERANCE).any() or xy[:, 0].max() > width + TOLERANCE \
                    or xy[:, 1].max() > height + TOLERANCE:
                problems.append(f"polygon {k} outside the {width}x{height} image")
    else:
        try:
            rle = segmentation_to_rle(seg, height, width)
            if rle is not None and float(mask_utils.area(rle)) == 0:
                problems.append("degenerate RLE mask: zero area")
        except (ValueError, TypeError, KeyError) as e:
            problems.append(f"bad segmentation ({e})")
    return problems


def _duplicates(entries: list[dict[str, Any]]) -> list[Any]:
    return [k for k, n in Counter(e.get("id") for e in entries).items() if n > 1]


def _image_size(path: Path, how: ImageCheck) -> tuple[int, int] | None:
    """``(width, height)`` of the file (None with ``how="exists"``); :class:`ImageDecodeError` when it is unusable.

    ``header`` reads the size from the file's header only (cheap); ``decode`` decodes the whole file, which
    finds truncated files too."""
    if not path.is_file():
        raise ImageDecodeError(path, "image file not found")
    if how == "exists":
        return None
    if how == "decode":
        pixels = decode_image(path)
        return int(pixels.shape[1]), int(pixels.shape[0])
    try:
        with Image.open(path) as image:
            return image.size
    except Exception as e:  # noqa: BLE001 - any failure to read the header means an undecodable file
        raise ImageDecodeError(path, f"cannot decode image file ({' '.join(str(e).split())})") from None


# --------------------------------------------------------------------------------------------- checks


def check_split(
    split: str,
    data: Mapping[str, Any],
    *,
    json_file: str | Path,
    image_path: Callable[[Mapping[str, Any]], Path],
    images: ImageCheck = "decode",
    check_size: bool = True,
    ann_files: Mapping[Any, str] | None = None,
) -> tuple[list[Issue], list[Issue], SplitCounts]:
    """Every check of one split's COCO dict (already shaped by :func:`~sam3lora.data.coco_json.read_coco`).

    Returns ``(errors, warnings, counts)``; never raises for bad data. ``images`` says how far image files are
    read (see :func:`_image_size`); ``check_size`` compares their size with the json's.
    """
    jf = str(json_file)
    ann_files = ann_files or {}
    errors: list[Issue] = []
    warnings: list[Issue] = []
    for key, label in (("images", "image"), ("annotations", "annotation"), ("categories", "category")):
        dups = _duplicates(data[key])
        if dups:
            more = f" ({len(dups)} in all)" if len(dups) > 10 else ""
            errors.append(Issue(split, jf, None, f"duplicate {label} id(s) {dups[:10]}{more}",
                                fatal=key != "annotations"))
    if not data["categories"]:
        errors.append(Issue(split, jf, None, "no categories", fatal=True))
    cats = {c["id"]: c["name"] for c in data["categories"]}
    by_id = {im["id"]: im for im in data["images"]}
    counts = SplitCounts(images=len(by_id), per_category=dict.fromkeys(cats.values(), 0))
    sizes: dict[Any, tuple[int, int]] = {}

    for im in data["images"]:
        iid = im["id"]
        try:
            width, height = int(im["width"]), int(im["height"])
            if width <= 0 or height <= 0:
                raise ValueError
        except (TypeError, ValueError):
            errors.append(Issue(split, jf, iid, f"image size {im['width']}x{im['height']} is not two positive "
                                                "integers", sample=iid))
            continue
        sizes[iid] = (width, height)
        try:
            path = image_path(im)
        except DataError as e:
            errors.append(Issue(split, jf, iid, e.problem, sample=iid))
            continue
        try:
            size = _image_size(path, images)
        except ImageDecodeError as e:
            errors.append(Issue(split, str(path), iid, e.problem, sample=iid))
            continue
        if check_size and size is not None and size != (width, height):
            errors.append(Issue(split, str(path), iid, f"image is {size[0]}x{size[1]} but the annotations say "
                                                       f"{width}x{height}", sample=iid))

    annotated: set[Any] = set()
    for ann in data["annotations"]:
        aid = ann["id"]
        af = ann_files.get(aid, jf)
        iid = ann["image_id"]
        if iid not in by_id:
            errors.append(Issue(split, af, aid, f"annotation points to missing image id {iid}"))
            continue
        if ann["category_id"] not in cats:
            errors.append(Issue(split, af, aid, f"unknown category id {ann['category_id']}", sample=iid))
            continue
        if iid in sizes:
            for problem in _check_geometry(ann, *sizes[iid]):
                errors.append(Issue(split, af, aid, problem, sample=iid))
        annotated.add(iid)
        if ann.get("iscrowd", 0):
            counts.crowd += 1
            continue
        counts.instances += 1
        counts.per_category[cats[ann["category_id"]]] += 1
        if ann.get("segmentation") in ([], None):
            counts.box_only += 1
            note = "" if ann.get("box_only") else " (segmentation empty but box_only not set)"
            warnings.append(Issue(split, af, aid, f"box-only annotation (no mask){note}"))

    for iid in by_id:
        if iid not in annotated:
            counts.images_without_annotations += 1
            warnings.append(Issue(split, jf, iid, "image has no annotation"))
    for cid, name in cats.items():
        if counts.per_category[name] == 0:
            warnings.append(Issue(split, jf, cid, f"category {name!r} has no instances"))
    return errors, warnings, counts


# --------------------------------------------------------------------------------------------- layouts


def coco_image_path(image_dir: Path, json_file: Path) -> Callable[[Mapping[str, Any]], Path]:
    """``image entry -> file`` for a COCO split whose ``file_name`` is relative to ``image_dir``."""
    return lambda im: image_dir / safe_relpath(im["file_name"], json_file)


def coco_sources(src: str | Path) -> list[SplitSource]:
    """The splits of a COCO dataset in any layout :func:`~sam3lora.data.layouts.find_coco_splits` knows; a split
    whose json cannot be read has ``data=None`` and the reason as a fatal issue."""
    sources = []
    for split, (ann, image_dir) in find_coco_splits(src).items():
        source = SplitSource(split, ann, None, coco_image_path(image_dir, ann))
        try:
            source.data = read_coco(ann)
        except DataError as e:
            source.issues.append(Issue(split, e.path, None, e.problem, fatal=True))
        sources.append(source)
    return sources


def validate_sources(sources: Sequence[SplitSource], images: ImageCheck = "decode") -> Report:
    """Run :func:`check_split` on every source; the report's ``root`` is left to the caller."""
    report = Report(root=Path("."))
    for s in sources:
        report.errors.extend(s.issues)
        if s.data is None:
            continue
        errors, warnings, counts = check_split(s.split, s.data, json_file=s.json_file, image_path=s.image_path,
                                               images=images, check_size=s.check_size, ann_files=s.ann_files)
        report.errors.extend(errors)
        report.warnings.extend(warnings)
        report.counts[s.split] = counts
    return report


def print_report(report: Report, console: Console | None = None, limit: int = 20) -> None:
    """Print counts, then up to ``limit`` errors and warnings of each kind, with rich."""
    console = console or Console()
    table = Table(title=f"dataset {report.root}" + (f" ({report.layout})" if report.layout else ""))
    for col in ("split", "images", "instances", "crowd", "box-only", "images w/o annotations"):
        table.add_column(col, justify="right" if col != "split" else "left")
    for split, c in report.counts.items():
        table.add_row(split, str(c.images), str(c.instances), str(c.crowd), str(c.box_only),
                      str(c.images_without_annotations))
    console.print(table)
    for split, c in report.counts.items():
        per_cat = ", ".join(f"{name}: {n}" for name, n in c.per_category.items())
        console.print(f"[bold]{split}[/] instances per category: {per_cat or '-'}")
    for label, issues, style, cap in (("error", report.errors, "red", None),
                                      ("warning", report.warnings, "yellow", limit)):
        by_kind: dict[str, list[Issue]] = {}
        for issue in issues:
            by_kind.setdefault(issue.message.split(" (")[0].split(":")[0], []).append(issue)
        for group in by_kind.values():
            for issue in group[:cap]:
                console.print(f"[{style}]{label}[/]: {escape(str(issue))}", markup=True, highlight=False)
            if cap is not None and len(group) > cap:
                console.print(f"[{style}]{label}[/]: ... and {len(group) - cap} more like the above")
    verdict = "[green]OK[/]" if report.ok else f"[red]{len(report.errors)} error(s)[/]"
    console.print(f"{verdict}, {len(report.warnings)} warning(s)")
