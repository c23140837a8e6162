"""``sam3lora-data convert --from yolo``: an Ultralytics-style YOLO dataset -> the canonical COCO layout.

Reads ``data.yaml`` (``names`` as a list or a ``{index: name}`` dict; ``path``; ``train``/``val``/``test``
as an image folder, a list of folders, or a ``.txt`` list of images). Without split keys the usual layouts
are found: ``images/SPLIT`` + ``labels/SPLIT`` and ``SPLIT/images`` + ``SPLIT/labels`` (``valid`` ->
``val``). Label files are found as Ultralytics does (the last ``images`` folder of the path replaced by
``labels``, extension ``.txt``).

Label lines (normalised to [0, 1]):
- detection ``cls cx cy w h`` -> a box-only annotation (``segmentation: []``, ``box_only: true``);
- segmentation ``cls x1 y1 x2 y2 x3 y3 ...`` -> a pixel polygon, ``bbox`` its extent, ``area`` its
  rasterised area (pycocotools).
Class ``k`` becomes COCO category id ``k + 1``. Images are copied; an image whose EXIF orientation is not
upright is written transposed (labels refer to the upright image, as in Ultralytics).
"""

from __future__ import annotations

import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image, ImageOps
from pycocotools import mask as mask_utils

from sam3lora.data.coco_json import write_coco
from sam3lora.data.data_error import DataError, DataWarning
from sam3lora.data.images import IMAGE_EXTENSIONS
from sam3lora.data.layouts import split_name
from sam3lora.data.output_dirs import check_not_nested, check_replaceable, output_dir, write_marker
from sam3lora.data.validate import DatasetProblems, Issue, SplitSource, validate_sources

_TOL = 0.01  # normalised coordinates may overshoot [0, 1] by this much (then clipped)


YAML_NAMES = ("data.yaml", "data.yml", "dataset.yaml", "dataset.yml")  # what a YOLO dataset's yaml is called


def _find_yaml(src: Path) -> Path:
    if src.is_file():
        return src
    for name in YAML_NAMES:
        if (src / name).is_file():
            return src / name
    raise DataError(src, "no data.yaml found")


def _read_names(cfg: dict[str, Any], yaml_path: Path) -> list[str]:
    names = cfg.get("names")
    if isinstance(names, list) and names:
        out = [str(n) for n in names]
    elif isinstance(names, dict) and names:
        try:
            idx = {int(k): str(v) for k, v in names.items()}
        except (TypeError, ValueError):
            raise DataError(yaml_path, "'names' dict keys must be class indices 0..N-1") from None
        if sorted(idx) != list(range(len(idx))):
            raise DataError(yaml_path, f"'names' keys must be 0..{len(idx) - 1}, got {sorted(idx)}")
        out = [idx[i] for i in range(len(idx))]
    else:
        raise DataError(yaml_path, "'names' must be a non-empty list or {index: name} mapping")
    if "nc" in cfg and cfg["nc"] != len(out):
        raise DataError(yaml_path, f"'nc' is {cfg['nc']} but 'names' has {len(out)} entries")
    if len(set(out)) != len(out):
        raise DataError(yaml_path, f"duplicate class names in 'names': {out}")
    return out


def _resolve(root: Path, entry: str, yaml_path: Path) -> Path:
    p = Path(entry)
    if p.is_absolute():
        return p
    cand = (root / p).resolve()
    if not cand.exists() and entry.startswith("../"):  # Roboflow's "../train/images" (as Ultralytics does)
        cand = (root / entry[3:]).resolve()
    if not cand.exists():
        raise DataError(yaml_path, f"split path {entry!r} not found (resolved to {cand})")
    return cand


def _images_in(p: Path, yaml_path: Path) -> tuple[list[tuple[Path, Path]], list[Path]]:
    """``([(image, base folder)], [image folders])`` from a folder (recursive) or a ``.txt`` list of images."""
    if p.is_dir():
        return [(f, p) for f in sorted(p.rglob("*")) if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file()], [p]
    if p.suffix == ".txt":
        out = []
        for line in p.read_text(encoding="utf-8").splitlines():
            if line.strip():
                f = Path(line.strip())
                f = f if f.is_absolute() else (p.parent / f).resolve()
                if not f.is_file():
                    raise DataError(p, f"listed image {line.strip()!r} not found")
                out.append((f, f.parent))
        return out, sorted({f.parent for f, _ in out})
    raise DataError(yaml_path, f"split path {p} is neither a folder nor a .txt image list")


def _find_splits(cfg: dict[str, Any], yaml_path: Path) -> dict[str, tuple[list[tuple[Path, Path]], list[Path]]]:
    """``{split: ([(image, base folder)], [image folders])}`` from data.yaml's keys or the usual layouts."""
    root = yaml_path.parent
    if cfg.get("path"):
        p = Path(str(cfg["path"]))
        p = p if p.is_absolute() else (root / p)
        if p.is_dir():
            root = p.resolve()
        else:
            warnings.warn(f"{yaml_path}: 'path' {cfg['path']!r} not found, using the yaml's folder",
                          DataWarning, stacklevel=3)
    splits: dict[str, tuple[list[tuple[Path, Path]], list[Path]]] = {}

    def add(split: str, found: tuple[list[tuple[Path, Path]], list[Path]]) -> None:
        images, folders = splits.setdefault(split, ([], []))
        images.extend(found[0])
        folders.extend(found[1])

    keys = [k for k in ("train", "val", "valid", "test") if cfg.get(k)]
    for key in keys:
        split = split_name(key)
        assert split is not None
        if split in splits:
            raise DataError(yaml_path, f"both 'val' and 'valid' given for split '{split}'")
        entries = cfg[key] if isinstance(cfg[key], list) else [cfg[key]]
        splits[split] = ([], [])
        for e in entries:
            add(split, _images_in(_resolve(root, str(e), yaml_path), yaml_path))
    if not keys:
        for d in sorted(p for p in root.iterdir() if p.is_dir()):
            split = split_name(d.name)
            if split and (d / "images").is_dir():
                add(split, _images_in(d / "images", yaml_path))
        if (root / "images").is_dir():
            for d in sorted(p for p in (root / "images").iterdir() if p.is_dir()):
                split = split_name(d.name)
                if split:
                    add(split, _images_in(d, yaml_path))
    if not splits:
        raise DataError(yaml_path, "no split found (give train/val in data.yaml, or use images/SPLIT + "
                                   "labels/SPLIT or SPLIT/images + SPLIT/labels)")
    return splits


def label_path(image: Path) -> Path:
    """Ultralytics' rule: the last ``images`` folder of the path becomes ``labels``, extension ``.txt``."""
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    return Path(*parts).with_suffix(".txt")


def read_label_file(path: Path, n_classes: int, width: int, height: int,
                    ) -> tuple[list[tuple[str, dict[str, Any]]], list[tuple[str, str]]]:
    """Parse one YOLO label file -> ``([(file:line, annotation dict without ids, in pixels)], [(file:line, problem)])``:
    every malformed line is reported, none stops the others."""
    anns: list[tuple[str, dict[str, Any]]] = []
    problems: list[tuple[str, str]] = []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        return [], [(str(path), f"cannot read label file ({e})")]
    for lineno, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        where = f"{path}:{lineno}"
        try:
            values = [float(v) for v in fields]
        except ValueError:
            problems.append((where, f"non-numeric value in label line {line.strip()!r}"))
            continue
        cls = values[0]
        if not np.isfinite(cls) or cls != int(cls) or not 0 <= cls < n_classes:
            problems.append((where, f"class {fields[0]!r} is not an integer in 0..{n_classes - 1}"))
            continue
        coords = np.array(values[1:], dtype=np.float64)
        if len(coords) != 4 and (len(coords) < 6 or len(coords) % 2):
            problems.append((where, f"expected 'cls cx cy w h' or 'cls x1 y1 x2 y2 x3 y3 ...', got {len(fields)} "
                                    "values"))
            continue
        if not np.isfinite(coords).all() or (coords < -_TOL).any() or (coords > 1 + _TOL).any():
            problems.append((where, "coordinates must be normalised to [0, 1]"))
            continue
        coords = coords.clip(0.0, 1.0)
        cid = int(cls) + 1
        if len(coords) == 4:
            cx, cy, w, h = coords
            if w <= 0 or h <= 0:
                problems.append((where, f"box width and height must be > 0, got {w} x {h}"))
                continue
            x0, y0 = max(0.0, (cx - w / 2) * width), max(0.0, (cy - h / 2) * height)
            x1, y1 = min(float(width), (cx + w / 2) * width), min(float(height), (cy + h / 2) * height)
            bbox = [x0, y0, x1 - x0, y1 - y0]
            anns.append((where, {"category_id": cid, "segmentation": [], "box_only": True, "bbox": bbox,
                                 "area": bbox[2] * bbox[3], "iscrowd": 0}))
            continue
        xy = coords.reshape(-1, 2) * np.array([width, height])
        poly = [round(float(v), 3) for v in xy.ravel()]
        area = float(mask_utils.area(mask_utils.frPyObjects([poly], height, width))[0])
        if area <= 0:
            warnings.warn(f"{where}: polygon has no area, skipped", DataWarning, stacklevel=2)
            continue
        x0, y0 = xy.min(axis=0)
        x1, y1 = xy.max(axis=0)
        anns.append((where, {"category_id": cid, "segmentation": [poly], "bbox": [float(x0), float(y0),
                     float(x1 - x0), float(y1 - y0)], "area": area, "iscrowd": 0}))
    return anns, problems


def parse_label_file(path: Path, n_classes: int, width: int, height: int) -> list[dict[str, Any]]:
    """Parse one YOLO label file -> annotation dicts (no ids) in pixels; DataError names file and line of the
    first malformed line (:func:`read_label_file` reports them all)."""
    anns, problems = read_label_file(path, n_classes, width, height)
    if problems:
        raise DataError(*problems[0])
    return [a for _, a in anns]


def _upright_size(source: Path) -> tuple[int, int, bool]:
    """``(width, height, transposed)`` of an image as labels see it (EXIF orientation applied), from its header."""
    with Image.open(source) as im:
        orientation = im.getexif().get(0x0112, 1)
        w, h = im.size
    turned = orientation not in (1, None)
    return (h, w, True) if orientation in (5, 6, 7, 8) else (w, h, turned)


@dataclass
class YoloSplit:
    """One YOLO split read into a COCO dict: ``sources`` (image id -> source file), ``transposed`` (ids written
    upright), ``ann_files`` (annotation id -> ``label.txt:line``), ``issues`` met while reading."""

    split: str
    yaml_path: Path
    data: dict[str, Any]
    sources: dict[int, Path] = field(default_factory=dict)
    transposed: set[int] = field(default_factory=set)
    ann_files: dict[int, str] = field(default_factory=dict)
    issues: list[Issue] = field(default_factory=list)

    def source(self) -> SplitSource:
        """This split as :func:`sam3lora.data.validate.check_split` reads it (sizes come from the files)."""
        return SplitSource(self.split, self.yaml_path, self.data, lambda im: self.sources[int(im["id"])],
                           check_size=False, ann_files=dict(self.ann_files), issues=list(self.issues))


@dataclass
class YoloScan:
    """A YOLO dataset read without writing anything: class ``names`` and the splits."""

    yaml_path: Path
    names: list[str]
    splits: list[YoloSplit]


def _orphans(folders: list[Path], expected: set[Path]) -> list[Path]:
    """Label files under the label folders of ``folders`` that belong to no image (``classes.txt`` excepted)."""
    roots = {label_path(f / "x.jpg").parent for f in folders}
    roots = {r for r in roots if r.is_dir() and r not in folders}
    found = {t.resolve() for r in roots for t in r.rglob("*.txt") if t.is_file() and t.name != "classes.txt"}
    return sorted(found - expected)


def scan_yolo(src: str | Path) -> YoloScan:
    """Read a YOLO dataset (``src``: folder with data.yaml, or the yaml) into COCO dicts, reporting every bad label
    line, unreadable image, duplicate name and label file with no image as an :class:`Issue` (structural errors of
    data.yaml raise :class:`DataError`)."""
    yaml_path = _find_yaml(Path(src))
    try:
        cfg = yaml.safe_load(yaml_path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise DataError(yaml_path, f"invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(cfg, dict):
        raise DataError(yaml_path, "must be a YAML mapping")
    names = _read_names(cfg, yaml_path)
    categories = [{"id": i + 1, "name": n, "supercategory": "none"} for i, n in enumerate(names)]
    splits = []
    for split, (images, folders) in _find_splits(cfg, yaml_path).items():
        out = YoloSplit(split, yaml_path, {"images": [], "annotations": [], "categories": categories})
        seen: dict[str, Path] = {}
        expected: set[Path] = set()
        for image, base in images:
            labels = label_path(image)
            expected.add(labels.resolve())
            rel = image.relative_to(base).as_posix()
            if rel in seen:
                out.issues.append(Issue(split, str(image), None, f"same relative name as {seen[rel]}"))
                continue
            seen[rel] = image
            image_id = len(out.data["images"]) + 1
            try:
                width, height, turned = _upright_size(image)
            except Exception as e:  # noqa: BLE001 - any failure to read the header: an undecodable file
                out.issues.append(Issue(split, str(image), None, f"cannot decode image file "
                                                                 f"({' '.join(str(e).split())})"))
                continue
            out.sources[image_id] = image
            if turned:
                out.transposed.add(image_id)
            out.data["images"].append({"id": image_id, "file_name": rel, "width": width, "height": height})
            if not labels.is_file():
                continue
            anns, problems = read_label_file(labels, len(names), width, height)
            out.issues += [Issue(split, where, None, problem, sample=image_id) for where, problem in problems]
            for where, ann in anns:
                ann_id = len(out.data["annotations"]) + 1
                out.ann_files[ann_id] = where
                out.data["annotations"].append({"id": ann_id, "image_id": image_id, **ann})
        for orphan in _orphans(folders, expected):
            out.issues.append(Issue(split, str(orphan), None, "label file has no image (no image of that name in "
                                                              f"{', '.join(map(str, folders))})"))
        splits.append(out)
    return YoloScan(yaml_path, names, splits)


def _copy_image(source: Path, target: Path, transposed: bool) -> None:
    """Copy an image (written upright when its EXIF orientation is not: labels refer to the upright image)."""
    if not transposed:
        shutil.copyfile(source, target)
        return
    with Image.open(source) as im:
        ImageOps.exif_transpose(im).save(target, format=im.format)


def yolo_to_coco(src: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Convert a YOLO detection/segmentation dataset (``src``: folder with data.yaml, or the yaml) to the
    canonical layout at ``out``; return ``out``. Images without a label file are kept, unannotated.

    Every check of ``sam3lora-data validate`` runs first (each image decoded whole); any error refuses the
    conversion with all of them (:class:`~sam3lora.data.validate.DatasetProblems`) and writes nothing. ``out``
    is written whole, with the :data:`~sam3lora.data.output_dirs.CONVERTED_MARKER` file; a non-empty ``out`` is replaced
    only with ``overwrite`` and only when sam3lora wrote it.
    """
    src, out = Path(src), Path(out)
    yaml_path = _find_yaml(src)
    check_not_nested(yaml_path.parent, out)
    check_replaceable(out, overwrite)
    scan = scan_yolo(yaml_path)
    report = validate_sources([s.source() for s in scan.splits])
    if report.errors:
        raise DatasetProblems(src, report.errors, f"{len(report.errors)} problem(s) in the YOLO dataset; "
                                                  "nothing written")
    with output_dir(out, overwrite) as tmp:
        for split in scan.splits:
            (tmp / split.split / "images").mkdir(parents=True)
            for im in split.data["images"]:
                target = tmp / split.split / "images" / im["file_name"]
                target.parent.mkdir(parents=True, exist_ok=True)
                _copy_image(split.sources[im["id"]], target, im["id"] in split.transposed)
            write_coco(split.data, tmp / split.split / "annotations.json")
        write_marker(tmp, "yolo", yaml_path)
    return out
