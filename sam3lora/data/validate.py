"""``sam3lora-data validate``: check a canonical dataset (``ROOT/SPLIT/annotations.json`` + ``images/``).

Errors: missing or unreadable image, image size differing from the json, degenerate polygon (< 3 points
or zero area) or box (w or h <= 0), polygon/box outside the image (beyond ``TOLERANCE`` px), bad RLE,
unknown category id, duplicate image/annotation/category ids, annotation naming a missing image id,
an unreadable json. Warnings: category with no instances in a split, images with no annotation,
box-only annotations, a missing train or val split.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from rich.console import Console
from rich.table import Table

from sam3lora.data.coco import DataError, read_coco, safe_relpath, segmentation_to_rle

TOLERANCE = 1.0
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Issue:
    """One problem: where (split, file, id of the image/annotation/category) and what."""

    split: str
    file: str
    id: int | str | None
    message: str

    def __str__(self) -> str:
        where = f"{self.file}" + (f" [id {self.id}]" if self.id is not None else "")
        return f"{self.split}: {where}: {self.message}"


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
    """Validation result: ``errors`` and ``warnings`` (:class:`Issue`), ``counts`` per split."""

    root: Path
    errors: list[Issue] = field(default_factory=list)
    warnings: list[Issue] = field(default_factory=list)
    counts: dict[str, SplitCounts] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors


def _polygon_area(coords: list[float]) -> float:
    xy = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    x, y = xy[:, 0], xy[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _check_geometry(ann: dict[str, Any], width: int, height: int) -> list[str]:
    """Error messages for one annotation's bbox and segmentation."""
    problems: list[str] = []
    bbox = ann.get("bbox")
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, int | float) for v in bbox)):
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
        except (ValueError, TypeError) as e:
            problems.append(f"bad segmentation ({e})")
    return problems


def _duplicates(entries: list[dict[str, Any]]) -> list[Any]:
    return [k for k, n in Counter(e.get("id") for e in entries).items() if n > 1]


def _validate_split(report: Report, split: str, split_dir: Path) -> None:
    ann_file = split_dir / "annotations.json"
    af = str(ann_file)
    err = lambda i, m: report.errors.append(Issue(split, af, i, m))
    warn = lambda i, m: report.warnings.append(Issue(split, af, i, m))
    try:
        data = read_coco(ann_file)
    except DataError as e:
        err(None, e.problem)
        return
    for key, label in (("images", "image"), ("annotations", "annotation"), ("categories", "category")):
        for dup in _duplicates(data[key]):
            err(dup, f"duplicate {label} id {dup}")
    cats = {c["id"]: c["name"] for c in data["categories"]}
    images = {im["id"]: im for im in data["images"]}
    counts = SplitCounts(images=len(images), per_category=dict.fromkeys(cats.values(), 0))
    report.counts[split] = counts

    for im in data["images"]:
        try:
            rel = safe_relpath(im["file_name"], ann_file)
        except DataError as e:
            err(im["id"], e.problem)
            continue
        path = split_dir / "images" / rel
        if not path.is_file():
            report.errors.append(Issue(split, str(path), im["id"], "missing image"))
            continue
        try:
            with Image.open(path) as pil:
                pil.load()
                size = pil.size
        except Exception as e:  # any decoder failure: unreadable
            report.errors.append(Issue(split, str(path), im["id"], f"unreadable image ({e})"))
            continue
        if size != (im["width"], im["height"]):
            report.errors.append(Issue(split, str(path), im["id"], f"image is {size[0]}x{size[1]} but the "
                                       f"json says {im['width']}x{im['height']}"))

    annotated: set[Any] = set()
    for ann in data["annotations"]:
        aid = ann["id"]
        im = images.get(ann["image_id"])
        if im is None:
            err(aid, f"annotation points to missing image id {ann['image_id']}")
            continue
        if ann["category_id"] not in cats:
            err(aid, f"unknown category id {ann['category_id']}")
            continue
        for problem in _check_geometry(ann, int(im["width"]), int(im["height"])):
            err(aid, problem)
        annotated.add(ann["image_id"])
        if ann.get("iscrowd", 0):
            counts.crowd += 1
            continue
        counts.instances += 1
        counts.per_category[cats[ann["category_id"]]] += 1
        if ann.get("segmentation") in ([], None):
            counts.box_only += 1
            note = "" if ann.get("box_only") else " (segmentation empty but box_only not set)"
            warn(aid, f"box-only annotation (no mask){note}")

    for image_id in images:
        if image_id not in annotated:
            counts.images_without_annotations += 1
            warn(image_id, "image has no annotation")
    for cid, name in cats.items():
        if counts.per_category[name] == 0:
            warn(cid, f"category {name!r} has no instances")


def validate_dataset(root: str | Path) -> Report:
    """Validate every split (train/val/test) under ``root``; never raises for bad data, reports it."""
    root = Path(root)
    report = Report(root=root)
    if not root.is_dir():
        report.errors.append(Issue("-", str(root), None, "dataset directory not found"))
        return report
    present = [s for s in SPLITS if (root / s / "annotations.json").exists()]
    if not present:
        report.errors.append(Issue("-", str(root), None, "no SPLIT/annotations.json found (splits: "
                                   f"{', '.join(SPLITS)})"))
        return report
    for s in ("train", "val"):
        if s not in present:
            report.warnings.append(Issue(s, str(root / s / "annotations.json"), None, f"no '{s}' split"))
    for split in present:
        _validate_split(report, split, root / split)
    return report


def print_report(report: Report, console: Console | None = None, limit: int = 20) -> None:
    """Print counts, then up to ``limit`` errors and warnings of each kind, with rich."""
    console = console or Console()
    table = Table(title=f"dataset {report.root}")
    for col in ("split", "images", "instances", "crowd", "box-only", "images w/o annotations"):
        table.add_column(col, justify="right" if col != "split" else "left")
    for split, c in report.counts.items():
        table.add_row(split, str(c.images), str(c.instances), str(c.crowd), str(c.box_only),
                      str(c.images_without_annotations))
    console.print(table)
    for split, c in report.counts.items():
        per_cat = ", ".join(f"{name}: {n}" for name, n in c.per_category.items())
        console.print(f"[bold]{split}[/] instances per category: {per_cat or '-'}")
    for label, issues, style in (("error", report.errors, "red"), ("warning", report.warnings, "yellow")):
        by_kind: dict[str, list[Issue]] = {}
        for issue in issues:
            by_kind.setdefault(issue.message.split(" (")[0].split(":")[0], []).append(issue)
        for group in by_kind.values():
            for issue in group[:limit]:
                console.print(f"[{style}]{label}[/]: {issue}", markup=True, highlight=False)
            if len(group) > limit:
                console.print(f"[{style}]{label}[/]: ... and {len(group) - limit} more like the above")
    verdict = "[green]OK[/]" if report.ok else f"[red]{len(report.errors)} error(s)[/]"
    console.print(f"{verdict}, {len(report.warnings)} warning(s)")
