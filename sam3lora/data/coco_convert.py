"""``sam3lora-data convert --from coco``: a Roboflow or classic COCO export -> the canonical layout
(``SPLIT/annotations.json`` + ``SPLIT/images/``), with optional prompt phrasings per category."""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pycocotools import mask as mask_utils

from sam3lora.data.coco_json import safe_relpath, write_coco
from sam3lora.data.data_error import DataError, DataWarning
from sam3lora.data.masks import segmentation_to_rle
from sam3lora.data.output_dirs import check_not_nested, check_replaceable, output_dir, write_marker


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
