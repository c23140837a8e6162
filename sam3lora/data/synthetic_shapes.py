"""Synthetic instance-segmentation demo sets: coloured shapes on cluttered backgrounds.

:func:`write_synthetic` writes the canonical layout of ``docs/contracts.md``::

    out/train/annotations.json   out/train/images/000000.png ...
    out/val/annotations.json     out/val/images/000000.png ...

Each category is ``"<colour> <shape>"`` (e.g. ``"red circle"``), its name being the text prompt.
Per image: a background (noise, gradient, smooth texture or stripes, plus muted clutter), optionally
1-2 unannotated *hard negatives* (a colour and a shape of the category set combined into a pair that is
not a category, e.g. a "red square" when "red circle" and "blue square" are categories), then 1-6
category objects of varied size, often overlapping or touching. Later objects are on top: an earlier
object's mask loses its hidden part, and instances left with fewer than ``MIN_AREA`` px (or under
``MIN_VISIBLE`` of their full area) are removed from the image before it is drawn, so every visible
category object is annotated. Polygons are traced from the visible mask (holes slit open, see
:func:`sam3lora.data.masks.mask_to_polygons`); ``bbox`` and ``area`` come from the rasterised polygons.
Every image lacks at least one category when there are two or more (negative prompts exist).
Output is deterministic per ``seed`` (byte-identical files).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from sam3lora.data.data_error import DataError
from sam3lora.data.masks import mask_to_polygons, rle_area_bbox
from sam3lora.data.output_dirs import output_dir

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 35),
    "green": (35, 175, 50),
    "blue": (35, 70, 225),
    "yellow": (240, 220, 35),
    "magenta": (225, 45, 205),
    "cyan": (40, 215, 225),
    "orange": (250, 140, 25),
    "purple": (125, 45, 175),
    "white": (248, 248, 248),
    "black": (12, 12, 12),
}
SHAPES: tuple[str, ...] = (
    "circle", "square", "triangle", "star", "ring", "cross", "ellipse", "hexagon", "pentagon", "diamond",
)
DEFAULT_CATEGORIES: tuple[str, ...] = (
    "red circle", "blue square", "green triangle", "yellow star", "magenta ring",
)
MARKER = ".sam3lora-synthetic"  # written into every generated set: only marked directories are ever replaced
MIN_AREA = 20
MIN_VISIBLE = 0.2
MAX_OBJECTS = 6
_SPLIT_SEEDS = {"train": 0, "val": 1}


@dataclass(frozen=True)
class Category:
    """One synthetic category: ``name`` is ``"<colour> <shape>"``."""

    name: str
    colour: str
    shape: str


def parse_categories(names: Sequence[str] | None) -> list[Category]:
    """Parse ``"<colour> <shape>"`` names (case and spacing normalised); ValueError on unknown words."""
    if names is None:
        names = DEFAULT_CATEGORIES
    if isinstance(names, str):
        names = names.split(",")
    cats: list[Category] = []
    for raw in names:
        words = str(raw).lower().split()
        if len(words) != 2:
            raise ValueError(f"category {raw!r} must be '<colour> <shape>', e.g. 'red circle'")
        colour, shape = words
        if colour not in COLOURS:
            raise ValueError(f"category {raw!r}: unknown colour {colour!r} (known: {', '.join(COLOURS)})")
        if shape not in SHAPES:
            raise ValueError(f"category {raw!r}: unknown shape {shape!r} (known: {', '.join(SHAPES)})")
        name = f"{colour} {shape}"
        if any(c.name == name for c in cats):
            raise ValueError(f"category {name!r} given twice")
        cats.append(Category(name, colour, shape))
    if not cats:
        raise ValueError("at least one category is needed")
    return cats


# ------------------------------------------------------------------------------------------- geometry


def _regular(n: int, r: float, start: float = -np.pi / 2) -> np.ndarray:
    t = start + np.arange(n) * 2 * np.pi / n
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


def _shape_outline(shape: str, r: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
    """Outline (N, 2) centred on 0 and an optional inner outline to cut out (rings), before rotation."""
    if shape == "circle":
        return _regular(96, r), None
    if shape == "ring":
        return _regular(96, r), _regular(96, r * rng.uniform(0.45, 0.62))
    if shape == "ellipse":
        return _regular(96, r) * np.array([1.0, rng.uniform(0.45, 0.7)]), None
    if shape == "square":
        return _regular(4, r * 1.2, np.pi / 4), None
    if shape == "diamond":
        return _regular(4, r * 1.2, 0.0) * np.array([0.65, 1.0]), None
    if shape == "triangle":
        return _regular(3, r * 1.25), None
    if shape == "pentagon":
        return _regular(5, r * 1.1), None
    if shape == "hexagon":
        return _regular(6, r * 1.05), None
    if shape == "star":
        outer, inner = _regular(5, r * 1.3), _regular(5, r * 1.3 * 0.45, -np.pi / 2 + np.pi / 5)
        return np.stack([outer, inner], axis=1).reshape(-1, 2), None
    if shape == "cross":
        a, b = r * 1.1, r * 1.1 * rng.uniform(0.3, 0.42)
        pts = [(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b), (b, a), (-b, a), (-b, b), (-a, b),
               (-a, -b), (-b, -b)]
        return np.array(pts, dtype=np.float64), None
    raise ValueError(f"unknown shape {shape!r}")


@dataclass
class _Object:
    shape: str
    colour: str
    cx: float
    cy: float
    r: float
    angle: float
    category_id: int | None  # None: an unannotated hard negative


def _object_mask(obj: _Object, size: int, rng: np.random.Generator) -> np.ndarray:
    """Full (unoccluded) uint8 mask (size, size) of an object, polygons filled at 1/16 px precision."""
    outer, inner = _shape_outline(obj.shape, obj.r, rng)
    c, s = np.cos(obj.angle), np.sin(obj.angle)
    rot = np.array([[c, -s], [s, c]])
    mask = np.zeros((size, size), np.uint8)

    def fill(pts: np.ndarray, value: int) -> None:
        xy = pts @ rot.T + np.array([obj.cx, obj.cy])
        cv2.fillPoly(mask, [np.round(xy * 16).astype(np.int32)], value, lineType=cv2.LINE_8, shift=4)

    fill(outer, 1)
    if inner is not None:
        fill(inner, 0)
    return mask


# ----------------------------------------------------------------------------------------- appearance


def _muted(rng: np.random.Generator) -> np.ndarray:
    """A low-saturation mid-tone colour (never mistaken for a category colour)."""
    grey = rng.uniform(80, 175)
    tint = rng.uniform(-1, 1, size=3) * rng.uniform(10, 35)
    return np.clip(grey + tint, 40, 215)


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    """float32 (size, size, 3) background: noise, gradient, smooth texture or stripes, plus clutter."""
    kind = rng.integers(4)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    if kind == 0:  # flat colour + noise
        img = np.broadcast_to(_muted(rng), (size, size, 3)).astype(np.float32)
    elif kind == 1:  # linear gradient between two colours
        a, b, t = _muted(rng), _muted(rng), rng.uniform(0, 2 * np.pi)
        w = (np.cos(t) * xx + np.sin(t) * yy)
        w = (w - w.min()) / max(float(np.ptp(w)), 1e-6)
        img = a[None, None] * (1 - w[..., None]) + b[None, None] * w[..., None]
    elif kind == 2:  # smooth random texture
        cells = int(rng.integers(3, 9))
        grid = rng.uniform(-1, 1, size=(cells, cells, 3)).astype(np.float32)
        tex = cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC)
        img = _muted(rng)[None, None] + tex * rng.uniform(15, 40)
    else:  # stripes
        a, b, t = _muted(rng), _muted(rng), rng.uniform(0, np.pi)
        period = rng.uniform(0.05, 0.2)
        w = ((np.cos(t) * xx + np.sin(t) * yy) / period) % 1.0 < 0.5
        img = np.where(w[..., None], a[None, None], b[None, None])
    img = np.ascontiguousarray(img, dtype=np.float32)
    for _ in range(int(rng.integers(0, 9))):  # muted clutter: lines and blobs
        colour = tuple(float(v) for v in _muted(rng))
        p = rng.uniform(0, size, size=4).astype(int)
        if rng.random() < 0.5:
            cv2.line(img, (p[0], p[1]), (p[2], p[3]), colour, int(rng.integers(1, 4)))
        else:
            cv2.circle(img, (p[0], p[1]), int(rng.integers(2, max(3, size // 25))), colour, -1)
    img += rng.normal(0, rng.uniform(2, 12), size=img.shape).astype(np.float32)
    return img


def _paint(img: np.ndarray, mask: np.ndarray, colour: str, rng: np.random.Generator) -> None:
    """Paint an object in place: jittered base colour, a soft linear shading and pixel noise."""
    base = np.array(COLOURS[colour], np.float32) + rng.uniform(-15, 15, size=3).astype(np.float32)
    ys, xs = np.nonzero(mask)
    t = rng.uniform(0, 2 * np.pi)
    proj = (np.cos(t) * xs + np.sin(t) * ys).astype(np.float32)
    shade = (proj - proj.mean()) / max(float(np.ptp(proj)), 1.0) * rng.uniform(0, 30)
    noise = rng.normal(0, 4, size=(len(ys), 3)).astype(np.float32)
    img[ys, xs] = base[None] + shade[:, None] + noise


# ----------------------------------------------------------------------------------------- one image


def _place(objs: list[_Object], shape: str, colour: str, cid: int | None, size: int,
           rng: np.random.Generator) -> _Object:
    r_min, r_max = max(5.0, 0.05 * size), 0.19 * size
    r = float(np.exp(rng.uniform(np.log(r_min), np.log(r_max))))
    if objs and rng.random() < 0.5:  # overlap or touch an existing object
        o = objs[int(rng.integers(len(objs)))]
        t, d = rng.uniform(0, 2 * np.pi), (o.r + r) * rng.uniform(0.5, 1.0)
        cx, cy = o.cx + d * np.cos(t), o.cy + d * np.sin(t)
    else:
        cx, cy = rng.uniform(0.6 * r, size - 0.6 * r, size=2)
    cx, cy = float(np.clip(cx, 0.3 * r, size - 0.3 * r)), float(np.clip(cy, 0.3 * r, size - 0.3 * r))
    return _Object(shape, colour, cx, cy, r, float(rng.uniform(0, 2 * np.pi)), cid)


def _make_image(cats: list[Category], size: int, index: int, rng: np.random.Generator, hard_negatives: float,
                ) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """Render one image: uint8 (size, size, 3) and ``[(category_id, visible bool mask)]`` in draw order."""
    n = len(cats)
    if n == 1:
        present = [0] if rng.random() < 0.8 else []
    else:
        k = int(rng.integers(1, min(n - 1, 3) + 1))
        others = [i for i in range(n) if i != index % n]
        present = [index % n, *rng.choice(others, size=k - 1, replace=False).tolist()]
    objs: list[_Object] = []
    pairs = {(c.colour, c.shape) for c in cats}
    colours, shapes = dict.fromkeys(c.colour for c in cats), dict.fromkeys(c.shape for c in cats)
    hard = [(col, shp) for col in colours for shp in shapes if (col, shp) not in pairs]
    if hard and rng.random() < hard_negatives:
        for _ in range(int(rng.integers(1, 3))):
            col, shp = hard[int(rng.integers(len(hard)))]
            objs.append(_place(objs, shp, col, None, size, rng))
    n_hard = len(objs)
    if present:
        for _ in range(int(rng.integers(1, MAX_OBJECTS + 1))):
            ci = int(present[int(rng.integers(len(present)))])
            objs.append(_place(objs, cats[ci].shape, cats[ci].colour, ci + 1, size, rng))
    full = [_object_mask(o, size, rng).astype(bool) for o in objs]

    keep = list(range(len(objs)))
    while True:  # drop category objects left too small by occlusion, then recompute
        covered = np.zeros((size, size), bool)
        visible: dict[int, np.ndarray] = {}
        for i in reversed(keep):
            visible[i] = full[i] & ~covered
            covered |= full[i]
        bad = [i for i in keep if i >= n_hard
               and (visible[i].sum() < MIN_AREA or visible[i].sum() < MIN_VISIBLE * max(full[i].sum(), 1))]
        if not bad:
            break
        keep = [i for i in keep if i not in bad]

    img = _background(size, rng)
    for i in keep:
        _paint(img, full[i], objs[i].colour, rng)
    out = np.clip(np.round(img), 0, 255).astype(np.uint8)
    instances = [(int(objs[i].category_id), visible[i]) for i in keep if i >= n_hard]
    return out, instances


def render_image(cats: list[Category], size: int, seed: int, split: str, index: int, hard_negatives: float,
                 ) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """Image ``index`` of ``split`` as :func:`write_synthetic` draws it: uint8 (size, size, 3) and
    ``[(category_id, visible bool mask)]`` (visible masks never overlap)."""
    rng = np.random.default_rng([seed, _SPLIT_SEEDS[split], index])
    return _make_image(cats, size, index, rng, hard_negatives)


def _split_coco(cats: list[Category], split: str, count: int, size: int, seed: int, images_dir: Path,
                hard_negatives: float
                ) -> dict[str, Any]:
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for index in range(count):
        img, instances = render_image(cats, size, seed, split, index, hard_negatives)
        file_name = f"{index:06d}.png"
        Image.fromarray(img, "RGB").save(images_dir / file_name, format="PNG")
        image_id = index + 1
        images.append({"id": image_id, "file_name": file_name, "width": size, "height": size})
        for cid, mask in instances:
            polys = mask_to_polygons(mask)
            if not polys:
                continue
            rle = mask_utils.merge(mask_utils.frPyObjects(polys, size, size))
            area, bbox = rle_area_bbox(rle)
            if area < MIN_AREA:
                continue
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": cid, "segmentation": polys,
                "area": area, "bbox": bbox, "iscrowd": 0,
            })
    return {
        "info": {"description": "sam3lora synthetic shapes", "split": split, "seed": seed},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": c.name, "supercategory": c.shape} for i, c in enumerate(cats)],
    }


def is_synthetic(root: str | Path) -> bool:
    """Whether ``root`` is a set this module generated (it holds the :data:`MARKER` file)."""
    return (Path(root) / MARKER).is_file()


def check_replaceable(out: str | Path, overwrite: bool) -> None:
    """Refuse to write into a non-empty ``out`` unless it is a generated synthetic set and ``overwrite``: a
    directory without the marker (a real dataset, anything else) is never replaced, whatever the flags."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(out, "exists and is not a directory")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not is_synthetic(out):
        raise DataError(out, f"is not empty and is not a generated synthetic set (no {MARKER} file): it is never "
                             "replaced; choose another directory")
    if not overwrite:
        raise DataError(out, "is not empty: a synthetic set generated earlier "
                             "(pass overwrite / --overwrite to regenerate it)")


def write_synthetic(out: str | Path, *, train: int = 64, val: int = 16, size: int = 224, seed: int = 0,
                    categories: Sequence[str] | None = None, overwrite: bool = False, hard_negatives: float = 0.5,
                    ) -> Path:
    """Write a synthetic shapes dataset (``out/{train,val}/annotations.json`` + ``images/``); return ``out``.

    ``categories``: ``"<colour> <shape>"`` names (default :data:`DEFAULT_CATEGORIES`); colours from
    :data:`COLOURS`, shapes from :data:`SHAPES`. The directory is written whole (temp dir + rename) and holds
    the :data:`MARKER` file (the settings); a non-empty ``out`` is refused unless it holds that marker (a set
    generated earlier) and ``overwrite`` is given: anything else is never replaced. ``hard_negatives``:
    probability that an image also holds 1-2 unannotated objects that combine a colour and a shape of the set into
    a pair that is not a category (0 turns them off). Raises :class:`DataError` on bad arguments.
    """
    out = Path(out)
    try:
        cats = parse_categories(categories)
    except ValueError as e:
        raise DataError("--categories", str(e)) from None
    if size < 32:
        raise DataError("--size", f"image size must be >= 32 px, got {size}")
    if not 0.0 <= hard_negatives <= 1.0:
        raise DataError("--hard-negatives", f"must be a probability in [0, 1], got {hard_negatives}")
    if train < 0 or val < 0 or train + val == 0:
        raise DataError("--train/--val", f"need counts >= 0, not both 0 (got {train}, {val})")
    check_replaceable(out, overwrite)
    with output_dir(out, overwrite=True) as tmp:
        settings = {"train": train, "val": val, "size": size, "seed": seed, "categories": [c.name for c in cats],
                    "hard_negatives": hard_negatives}
        (tmp / MARKER).write_text(json.dumps({"written_by": "sam3lora synthetic", **settings}, indent=2) + "\n")
        for split, count in (("train", train), ("val", val)):
            images_dir = tmp / split / "images"
            images_dir.mkdir(parents=True)
            data = _split_coco(cats, split, count, size, seed, images_dir, hard_negatives)
            (tmp / split / "annotations.json").write_text(json.dumps(data, separators=(",", ":")), "utf-8")
    return out
