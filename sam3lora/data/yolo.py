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
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image, ImageOps
from pycocotools import mask as mask_utils

from sam3lora.data.coco import (
    IMAGE_EXTENSIONS,
    DataError,
    DataWarning,
    check_not_nested,
    check_output_dir,
    output_dir,
    split_name,
    write_coco,
)

_TOL = 0.01  # normalised coordinates may overshoot [0, 1] by this much (then clipped)


def _find_yaml(src: Path) -> Path:
    if src.is_file():
        return src
    for name in ("data.yaml", "data.yml", "dataset.yaml", "dataset.yml"):
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


def _images_in(p: Path, yaml_path: Path) -> list[tuple[Path, Path]]:
    """``[(image, base folder)]`` from a folder (recursive) or a ``.txt`` list of images."""
    if p.is_dir():
        return [(f, p) for f in sorted(p.rglob("*")) if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file()]
    if p.suffix == ".txt":
        out = []
        for line in p.read_text(encoding="utf-8").splitlines():
            if line.strip():
                f = Path(line.strip())
                f = f if f.is_absolute() else (p.parent / f).resolve()
                if not f.is_file():
                    raise DataError(p, f"listed image {line.strip()!r} not found")
                out.append((f, f.parent))
        return out
    raise DataError(yaml_path, f"split path {p} is neither a folder nor a .txt image list")


def _find_splits(cfg: dict[str, Any], yaml_path: Path) -> dict[str, list[tuple[Path, Path]]]:
    root = yaml_path.parent
    if cfg.get("path"):
        p = Path(str(cfg["path"]))
        p = p if p.is_absolute() else (root / p)
        if p.is_dir():
            root = p.resolve()
        else:
            warnings.warn(f"{yaml_path}: 'path' {cfg['path']!r} not found, using the yaml's folder",
                          DataWarning, stacklevel=3)
    splits: dict[str, list[tuple[Path, Path]]] = {}
    keys = [k for k in ("train", "val", "valid", "test") if cfg.get(k)]
    for key in keys:
        split = split_name(key)
        assert split is not None
        if split in splits:
            raise DataError(yaml_path, f"both 'val' and 'valid' given for split '{split}'")
        entries = cfg[key] if isinstance(cfg[key], list) else [cfg[key]]
        splits[split] = [x for e in entries for x in _images_in(_resolve(root, str(e), yaml_path), yaml_path)]
    if not keys:
        for d in sorted(p for p in root.iterdir() if p.is_dir()):
            split = split_name(d.name)
            if split and (d / "images").is_dir():
                splits.setdefault(split, []).extend(_images_in(d / "images", yaml_path))
        if (root / "images").is_dir():
            for d in sorted(p for p in (root / "images").iterdir() if p.is_dir()):
                split = split_name(d.name)
                if split:
                    splits.setdefault(split, []).extend(_images_in(d, yaml_path))
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


def parse_label_file(path: Path, n_classes: int, width: int, height: int) -> list[dict[str, Any]]:
    """Parse one YOLO label file -> annotation dicts (no ids) in pixels; DataError names file and line."""
    anns: list[dict[str, Any]] = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        where = f"{path}:{lineno}"
        try:
            values = [float(v) for v in fields]
        except ValueError:
            raise DataError(where, f"non-numeric value in label line {line.strip()!r}") from None
        cls = values[0]
        if cls != int(cls) or not 0 <= cls < n_classes:
            raise DataError(where, f"class {fields[0]!r} is not an integer in 0..{n_classes - 1}")
        coords = np.array(values[1:], dtype=np.float64)
        if len(coords) != 4 and (len(coords) < 6 or len(coords) % 2):
            raise DataError(where, f"expected 'cls cx cy w h' or 'cls x1 y1 x2 y2 x3 y3 ...', got {len(fields)} "
                                   "values")
        if (coords < -_TOL).any() or (coords > 1 + _TOL).any():
            raise DataError(where, "coordinates must be normalised to [0, 1]")
        coords = coords.clip(0.0, 1.0)
        cid = int(cls) + 1
        if len(coords) == 4:
            cx, cy, w, h = coords
            if w <= 0 or h <= 0:
                raise DataError(where, f"box width and height must be > 0, got {w} x {h}")
            x0, y0 = max(0.0, (cx - w / 2) * width), max(0.0, (cy - h / 2) * height)
            x1, y1 = min(float(width), (cx + w / 2) * width), min(float(height), (cy + h / 2) * height)
            bbox = [x0, y0, x1 - x0, y1 - y0]
            anns.append({"category_id": cid, "segmentation": [], "box_only": True, "bbox": bbox,
                         "area": bbox[2] * bbox[3], "iscrowd": 0})
            continue
        xy = coords.reshape(-1, 2) * np.array([width, height])
        poly = [round(float(v), 3) for v in xy.ravel()]
        area = float(mask_utils.area(mask_utils.frPyObjects([poly], height, width))[0])
        if area <= 0:
            warnings.warn(f"{where}: polygon has no area, skipped", DataWarning, stacklevel=2)
            continue
        x0, y0 = xy.min(axis=0)
        x1, y1 = xy.max(axis=0)
        anns.append({"category_id": cid, "segmentation": [poly], "bbox": [float(x0), float(y0),
                     float(x1 - x0), float(y1 - y0)], "area": area, "iscrowd": 0})
    return anns


def _copy_image(source: Path, target: Path) -> tuple[int, int]:
    """Copy an image (transposed when its EXIF orientation is not upright); return (width, height)."""
    try:
        with Image.open(source) as im:
            orientation = im.getexif().get(0x0112, 1)
            if orientation not in (1, None):
                upright = ImageOps.exif_transpose(im)
                upright.save(target, format=im.format)
                return upright.size
            size = im.size
    except OSError as e:
        raise DataError(source, f"cannot read image ({e})") from None
    shutil.copyfile(source, target)
    return size


def yolo_to_coco(src: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Convert a YOLO detection/segmentation dataset (``src``: folder with data.yaml, or the yaml) to the
    canonical layout at ``out``; return ``out``. Images without a label file are kept, unannotated.
    """
    src, out = Path(src), Path(out)
    yaml_path = _find_yaml(src)
    check_not_nested(yaml_path.parent, out)
    check_output_dir(out, overwrite)
    try:
        cfg = yaml.safe_load(yaml_path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise DataError(yaml_path, f"invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(cfg, dict):
        raise DataError(yaml_path, "must be a YAML mapping")
    names = _read_names(cfg, yaml_path)
    splits = _find_splits(cfg, yaml_path)
    categories = [{"id": i + 1, "name": n, "supercategory": "none"} for i, n in enumerate(names)]
    with output_dir(out, overwrite) as tmp:
        for split, images in splits.items():
            (tmp / split / "images").mkdir(parents=True)
            coco_images: list[dict[str, Any]] = []
            annotations: list[dict[str, Any]] = []
            seen: dict[str, Path] = {}
            for image, base in images:
                rel = image.relative_to(base).as_posix()
                if rel in seen:
                    raise DataError(image, f"same relative name as {seen[rel]} in split '{split}'")
                seen[rel] = image
                target = tmp / split / "images" / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                width, height = _copy_image(image, target)
                image_id = len(coco_images) + 1
                coco_images.append({"id": image_id, "file_name": rel, "width": width, "height": height})
                labels = label_path(image)
                if labels.is_file():
                    for ann in parse_label_file(labels, len(names), width, height):
                        annotations.append({"id": len(annotations) + 1, "image_id": image_id, **ann})
            write_coco({"images": coco_images, "annotations": annotations, "categories": categories},
                       tmp / split / "annotations.json")
    return out
