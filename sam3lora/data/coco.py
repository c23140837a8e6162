"""COCO json helpers shared by every data tool.

- :class:`DataError`: a user-facing error naming the file and the problem (``"<file>: <problem>"``).
- :func:`read_coco` / :func:`write_coco`: read with clear errors, write whole (temp file + rename).
- :func:`output_dir`: the "write a directory whole" context manager every converter uses.
- :func:`annotation_to_mask` / :func:`mask_to_polygons`: masks <-> COCO segmentations via pycocotools.
- :func:`normalise_coco`: ``sam3lora-data convert --from coco`` (Roboflow and classic COCO layouts).

Segmentations are kept as they come: polygons stay polygons and RLE (compressed or uncompressed) stays
RLE, so masks are bit-identical to the source; every reader decodes them with :func:`annotation_to_mask`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import yaml
from pycocotools import mask as mask_utils

from sam3lora.errors import Sam3LoRAError
from sam3lora.io import atomic_dir, write_whole

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


class DataError(Sam3LoRAError):
    """Bad user input: ``str(err)`` is ``"<file>: <problem>"``; ``path`` and ``problem`` are kept apart."""

    def __init__(self, path: str | os.PathLike[str], problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


# --------------------------------------------------------------------------------------------- json I/O


def read_coco(path: str | Path) -> dict[str, Any]:
    """Read a COCO json and check its top-level shape.

    Requires ``images``, ``annotations`` and ``categories`` lists, each entry a dict holding the keys
    every tool relies on (``images``: id, file_name, width, height; ``annotations``: id, image_id,
    category_id, bbox; ``categories``: id, name). Raises :class:`DataError` naming the file otherwise.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "file not found")
    try:
        with path.open("r", encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(path, f"invalid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(path, f"cannot read ({e})") from None
    if not isinstance(data, dict):
        raise DataError(path, "top level must be a JSON object")
    required = {
        "images": ("id", "file_name", "width", "height"),
        "annotations": ("id", "image_id", "category_id", "bbox"),
        "categories": ("id", "name"),
    }
    for key, fields in required.items():
        if key not in data:
            raise DataError(path, f"missing key '{key}'")
        if not isinstance(data[key], list):
            raise DataError(path, f"'{key}' must be a list")
        for i, entry in enumerate(data[key]):
            if not isinstance(entry, dict):
                raise DataError(path, f"{key}[{i}] must be an object")
            missing = [f for f in fields if f not in entry]
            if missing:
                raise DataError(path, f"{key}[{i}] (id {entry.get('id', '?')}) missing key(s) {missing}")
    return data


def check_unique_ids(data: Mapping[str, Any], path: str | Path) -> None:
    """Refuse duplicate image ids (a COCO index keeps one image and gives it the annotations of both): a
    :class:`DataError` naming the file and the ids."""
    seen: set[Any] = set()
    duplicates: list[Any] = []
    for image in data["images"]:
        if image["id"] in seen and image["id"] not in duplicates:
            duplicates.append(image["id"])
        seen.add(image["id"])
    if duplicates:
        more = f" ({len(duplicates)} in all)" if len(duplicates) > 10 else ""
        raise DataError(path, f"duplicate image id(s) {duplicates[:10]}{more}")


def write_coco(data: Mapping[str, Any], path: str | Path) -> None:
    """Write a COCO dict as json, whole or not at all (``sam3lora.io.write_whole``)."""
    write_whole(path, json.dumps(data, separators=(",", ":")))


# ------------------------------------------------------------------------------------ whole directories


def check_output_dir(out: str | Path, overwrite: bool) -> Path:
    """Refuse an ``out`` that is a file, or a non-empty directory unless ``overwrite``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(out, "exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise DataError(out, "output directory is not empty (pass overwrite / --overwrite to replace it)")
    return out


def check_not_nested(src: str | Path, out: str | Path) -> None:
    """Refuse an ``out`` equal to, inside, or containing ``src`` (replacing it would destroy the input)."""
    s, o = Path(src).resolve(), Path(out).resolve()
    if s == o or s in o.parents or o in s.parents:
        raise DataError(out, f"output directory must not overlap the input directory {src}")


CONVERTED_MARKER = ".sam3lora-converted"  # written into every converted set: only sets sam3lora wrote are replaced
OWN_MARKERS = (CONVERTED_MARKER, ".sam3lora-synthetic")


def check_replaceable(out: str | Path, overwrite: bool) -> Path:
    """Refuse a non-empty ``out`` unless sam3lora wrote it (it holds :data:`CONVERTED_MARKER` or the synthetic
    writer's marker) and ``overwrite`` is given: any other directory is never replaced, whatever the flags."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(out, "exists and is not a directory")
    if not out.is_dir() or not any(out.iterdir()):
        return out
    if not any((out / m).is_file() for m in OWN_MARKERS):
        raise DataError(out, f"output directory is not empty and was not written by sam3lora (no {CONVERTED_MARKER} "
                             "file): it is never replaced; choose another directory")
    if not overwrite:
        raise DataError(out, "output directory is not empty: a set converted earlier "
                             "(pass overwrite / --overwrite to replace it)")
    return out


def write_marker(directory: Path, source_format: str, source: str | Path) -> None:
    """Write :data:`CONVERTED_MARKER` into a converted set (its format and source)."""
    record = {"written_by": "sam3lora-data convert", "format": source_format, "source": str(source)}
    (directory / CONVERTED_MARKER).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


@contextlib.contextmanager
def output_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """``sam3lora.io.atomic_dir`` after ``check_output_dir`` (whose errors name the directory)."""
    with atomic_dir(check_output_dir(out, overwrite), overwrite=True) as tmp:
        yield tmp


# ------------------------------------------------------------------------------------------------ masks


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


def category_index(categories: Sequence[Mapping[str, Any]]) -> dict[int, Mapping[str, Any]]:
    """``{category id: category}``."""
    return {int(c["id"]): c for c in categories}


# ------------------------------------------------------------------------------- convert --from coco


class DataWarning(UserWarning):
    """A recoverable problem in user data (printed as ``warning: ...`` by the CLI)."""


def split_name(name: str) -> str | None:
    """Canonical split for a directory/file stem: train, val (from val/valid/validation), test; else None.

    A 4-digit year suffix is accepted (``train2017`` -> ``train``).
    """
    m = re.fullmatch(r"(train|val|valid|validation|test)(\d{4})?", name.lower())
    return SPLIT_ALIASES[m.group(1)] if m else None


def safe_relpath(file_name: str, where: str | Path) -> str:
    """``file_name`` as a clean relative posix path; DataError if absolute or escaping with ``..``."""
    p = Path(str(file_name).replace("\\", "/"))
    if p.is_absolute() or ".." in p.parts or not p.parts:
        raise DataError(where, f"image file_name {file_name!r} must be a relative path inside the images")
    return p.as_posix()


def find_coco_splits(src: str | Path) -> dict[str, tuple[Path, Path]]:
    """``{split: (annotation json, image folder)}`` for the COCO layouts ``normalise_coco`` accepts.

    - Roboflow: ``SPLIT/_annotations.coco.json`` with the images next to it;
    - canonical: ``SPLIT/annotations.json`` + ``SPLIT/images/``;
    - classic: ``annotations/instances_SPLIT.json`` + ``SPLIT/`` or ``images/SPLIT/``.
    """
    src = Path(src)
    if not src.is_dir():
        raise DataError(src, "source directory not found")
    found: dict[str, tuple[Path, Path]] = {}

    def add(split: str, ann: Path, images: Path) -> None:
        if split in found:
            raise DataError(ann, f"second annotation file for split '{split}' (first: {found[split][0]})")
        found[split] = (ann, images)

    for d in sorted(p for p in src.iterdir() if p.is_dir()):
        split = split_name(d.name)
        if split is None:
            continue
        if (d / "_annotations.coco.json").is_file():
            add(split, d / "_annotations.coco.json", d)
        elif (d / "annotations.json").is_file():
            add(split, d / "annotations.json", d / "images")
    ann_dir = src / "annotations"
    if ann_dir.is_dir():
        for f in sorted(ann_dir.glob("instances_*.json")):
            stem = f.stem[len("instances_"):]
            split = split_name(stem)
            if split is None:
                continue
            candidates = [src / stem, src / "images" / stem, src / "images"]
            images = next((c for c in candidates if c.is_dir()), None)
            if images is None:
                raise DataError(f, f"image folder not found (looked for {', '.join(map(str, candidates))})")
            add(split, f, images)
    if not found:
        raise DataError(src, "no COCO split found (expected SPLIT/_annotations.coco.json, "
                             "annotations/instances_SPLIT.json or SPLIT/annotations.json)")
    return found


def read_prompts(path: str | Path) -> dict[str, list[str]]:
    """prompts.yaml: ``{category name: phrasing | [phrasings]}`` -> ``{name: [phrasings]}``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise DataError(path, f"invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict) or not data:
        raise DataError(path, "must be a non-empty mapping 'category name: prompt or [prompts]'")
    out: dict[str, list[str]] = {}
    for name, value in data.items():
        phrases = [value] if isinstance(value, str) else value
        ok = isinstance(phrases, list) and phrases and all(isinstance(p, str) and p.strip() for p in phrases)
        if not ok:
            raise DataError(path, f"prompts for {name!r} must be a non-empty string or list of strings")
        out[str(name)] = [p.strip() for p in phrases]
    return out


def _dummy_categories(splits: dict[str, dict[str, Any]]) -> set[int]:
    """Roboflow's placeholder: a category with no annotations whose name is another's supercategory."""
    used = {int(a["category_id"]) for d in splits.values() for a in d["annotations"]}
    dummies: set[int] = set()
    for d in splits.values():
        for c in d["categories"]:
            children = [c2 for c2 in d["categories"] if c2 is not c and c2.get("supercategory") == c["name"]]
            if int(c["id"]) not in used and children:
                dummies.add(int(c["id"]))
    return dummies


def _normalise_annotation(ann: dict[str, Any], image: Mapping[str, Any], ann_file: Path) -> dict[str, Any]:
    """Check one annotation's geometry and fill ``iscrowd``, ``area`` and ``box_only``."""
    ann = dict(ann)
    bbox = ann["bbox"]
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, int | float) for v in bbox)):
        raise DataError(ann_file, f"annotation {ann['id']}: bbox must be 4 numbers [x,y,w,h], got {bbox!r}")
    h, w = int(image["height"]), int(image["width"])
    try:
        rle = segmentation_to_rle(ann.get("segmentation"), h, w)
    except (ValueError, TypeError) as e:
        raise DataError(ann_file, f"annotation {ann['id']}: bad segmentation ({e})") from None
    ann["iscrowd"] = int(ann.get("iscrowd", 0))
    if rle is None:
        ann["segmentation"] = []
        ann["box_only"] = True
    if "area" not in ann:
        ann["area"] = float(mask_utils.area(rle)) if rle is not None else float(bbox[2] * bbox[3])
    return ann


def normalise_coco(src: str | Path, out: str | Path, prompts: str | Path | Mapping[str, Any] | None = None,
                   overwrite: bool = False) -> Path:
    """Convert a COCO dataset (Roboflow or classic layout) to the canonical layout; return ``out``.

    Splits: train, val (``valid`` -> ``val``), test. Every check of ``sam3lora-data validate`` runs first (each
    image decoded whole): any error (unknown category, box outside the image, truncated image, duplicate ids, ...)
    refuses the conversion with all of them (:class:`~sam3lora.data.validate.DatasetProblems`) and writes nothing.
    Images are copied (never moved), keeping their relative ``file_name``. Segmentations are kept as they are
    (polygons, or RLE compressed or not) so the masks are identical to the source; empty ones become box-only
    (``box_only: true``). Crowd annotations are kept with ``iscrowd: 1`` (readers skip them). Roboflow's
    annotation-less dummy supercategory is dropped with a :class:`DataWarning`. ``prompts`` (a yaml path or a
    mapping ``name -> str | [str]``) is stored in ``categories[].prompts``; an unknown name is a DataError.
    ``out`` is written whole with the :data:`CONVERTED_MARKER` file; a non-empty ``out`` is replaced only with
    ``overwrite`` and only when sam3lora wrote it.
    """
    from sam3lora.data.validate import DatasetProblems, Issue, coco_sources, validate_sources

    src, out = Path(src), Path(out)
    check_not_nested(src, out)
    check_replaceable(out, overwrite)
    sources = coco_sources(src)
    if prompts is None:
        prompt_map: dict[str, list[str]] = {}
    elif isinstance(prompts, Mapping):
        prompt_map = {str(k): [v] if isinstance(v, str) else list(v) for k, v in prompts.items()}
    else:
        prompt_map = read_prompts(prompts)
    report = validate_sources(sources)
    datasets = {s.split: s.data for s in sources if s.data is not None}
    names: dict[int, str] = {}
    for s in sources:
        for c in (s.data or {}).get("categories", []):
            cid = int(c["id"])
            if names.setdefault(cid, c["name"]) != c["name"]:
                report.errors.append(Issue(s.split, str(s.json_file), cid, f"category id {cid} is {c['name']!r} "
                                                                           f"here but {names[cid]!r} in another split"))
    if report.errors:
        raise DatasetProblems(src, report.errors, f"{len(report.errors)} problem(s) in the COCO dataset; "
                                                  "nothing written")
    dummies = _dummy_categories(datasets)
    for cid in sorted(dummies):
        warnings.warn(f"{src}: dropping category {cid} {names[cid]!r} (a supercategory with no annotations)",
                      DataWarning, stacklevel=2)
    known = {n for cid, n in names.items() if cid not in dummies}
    unknown = sorted(set(prompt_map) - known)
    if unknown:
        where = prompts if isinstance(prompts, str | Path) else "prompts"
        listed = ", ".join(map(repr, unknown))
        raise DataError(where, f"{listed} not a category (categories: {sorted(known)})")

    with output_dir(out, overwrite) as tmp:
        for s in sources:
            data = s.data
            assert data is not None  # a split without data has a fatal issue, refused above
            (tmp / s.split / "images").mkdir(parents=True)
            images = {}
            for im in data["images"]:
                rel = safe_relpath(im["file_name"], s.json_file)
                target = tmp / s.split / "images" / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(s.image_path(im), target)
                images[im["id"]] = {**im, "file_name": rel}
            annotations = [_normalise_annotation(a, images[a["image_id"]], s.json_file) for a in data["annotations"]]
            categories = []
            for c in data["categories"]:
                if int(c["id"]) in dummies:
                    continue
                c = dict(c)
                if c["name"] in prompt_map:
                    c["prompts"] = prompt_map[c["name"]]
                categories.append(c)
            result = {k: v for k, v in data.items() if k not in ("images", "annotations", "categories")}
            result.update(images=list(images.values()), annotations=annotations, categories=categories)
            write_coco(result, tmp / s.split / "annotations.json")
        write_marker(tmp, "coco", src)
    return out
