"""Tests for sam3lora.data.yolo.yolo_to_coco: YOLO-seg and YOLO-detect round trips, layouts, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from matplotlib.path import Path as MplPath
from PIL import Image

from sam3lora.data.data_error import DataError
from sam3lora.data.masks import annotation_to_mask
from sam3lora.data.validate import DatasetProblems
from sam3lora.data.yolo import yolo_to_coco

NAMES = ["cat", "dog", "traffic light"]
SIZES = {"train": [(80, 64), (64, 96), (72, 72)], "val": [(96, 64), (64, 64)]}  # (width, height)


def _polygon(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """A random convex-ish polygon (n, 2) in pixels, well inside the image."""
    n = int(rng.integers(3, 9))
    r = rng.uniform(8, min(w, h) / 3)
    cx, cy = rng.uniform(r + 1, w - r - 1), rng.uniform(r + 1, h - r - 1)
    t = rng.uniform(0, 2 * np.pi) + (np.arange(n) + rng.uniform(-0.2, 0.2, n)) * 2 * np.pi / n
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)


def _rasterise(poly: np.ndarray, w: int, h: int) -> np.ndarray:
    """Independent rasteriser: pixel (i, j) covers [j, j+1] x [i, i+1]; inside if its centre is."""
    yy, xx = np.mgrid[0:h, 0:w]
    centres = np.stack([xx.ravel() + 0.5, yy.ravel() + 0.5], axis=1)
    return MplPath(poly).contains_points(centres).reshape(h, w)


def make_yolo(root: Path, layout: str, names_form: str, kind: str, split_keys: bool, seed: int = 0) -> dict:
    """Write a YOLO dataset; return ``{(split, file name): [(class, pixel polygon or xyxy box)]}``."""
    rng = np.random.default_rng(seed)
    truth: dict = {}
    dirs = {}
    for split, sizes in SIZES.items():
        disk_split = "valid" if (split == "val" and layout == "split_first") else split
        img_dir = root / "images" / disk_split if layout == "images_first" else root / disk_split / "images"
        lab_dir = root / "labels" / disk_split if layout == "images_first" else root / disk_split / "labels"
        img_dir.mkdir(parents=True)
        lab_dir.mkdir(parents=True)
        dirs[split] = img_dir
        for i, (w, h) in enumerate(sizes):
            name = f"img{i}.jpg" if i % 2 else f"img{i}.png"
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(img_dir / name)
            if i == len(sizes) - 1:  # last image of each split: no label file
                truth[(split, name)] = []
                continue
            lines, objs = [], []
            for _ in range(int(rng.integers(1, 4))):
                cls = int(rng.integers(len(NAMES)))
                poly = _polygon(rng, w, h)
                if kind == "seg":
                    norm = (poly / [w, h]).ravel()
                    lines.append(" ".join([str(cls), *(f"{v:.6f}" for v in norm)]))
                    objs.append((cls, poly))
                else:
                    x0, y0 = poly.min(0)
                    x1, y1 = poly.max(0)
                    cx, cy, bw, bh = (x0 + x1) / 2 / w, (y0 + y1) / 2 / h, (x1 - x0) / w, (y1 - y0) / h
                    lines.append(f"{cls} {cx:.6f} {cy:.6f} {bw:.6f} {bh:.6f}")
                    objs.append((cls, np.array([x0, y0, x1, y1])))
            (lab_dir / Path(name).with_suffix(".txt")).write_text("\n".join(lines) + "\n")
            truth[(split, name)] = objs
    names = NAMES if names_form == "list" else {i: n for i, n in enumerate(NAMES)}
    cfg: dict = {"names": names, "nc": len(NAMES)}
    if split_keys:
        if layout == "images_first":
            cfg.update(path=".", train="images/train", val="images/val")
        else:  # Roboflow style: paths relative to the parent, fixed up like Ultralytics does
            cfg.update(train="../train/images", val="../valid/images")
    (root / "data.yaml").write_text(yaml.safe_dump(cfg))
    return truth


def _load(out: Path, split: str) -> dict:
    return json.loads((out / split / "annotations.json").read_text())


CASES = [("images_first", "list", True), ("images_first", "dict", False),
         ("split_first", "dict", True), ("split_first", "list", False)]


@pytest.mark.parametrize(("layout", "names_form", "split_keys"), CASES)
def test_yolo_seg_round_trip(tmp_path: Path, layout: str, names_form: str, split_keys: bool) -> None:
    truth = make_yolo(tmp_path / "src", layout, names_form, "seg", split_keys)
    out = yolo_to_coco(tmp_path / "src", tmp_path / "out")
    n_checked = 0
    for split in ("train", "val"):
        data = _load(out, split)
        assert [c["name"] for c in data["categories"]] == NAMES
        assert len(data["images"]) == len(SIZES[split])
        for im in data["images"]:
            w, h = SIZES[split][int(im["file_name"][3])]
            assert (im["width"], im["height"]) == (w, h)
            assert (out / split / "images" / im["file_name"]).is_file()
            anns = [a for a in data["annotations"] if a["image_id"] == im["id"]]
            objs = truth[(split, im["file_name"])]
            assert len(anns) == len(objs)
            for ann, (cls, poly) in zip(anns, objs, strict=True):
                assert ann["category_id"] == cls + 1 and not ann.get("box_only")
                want = _rasterise(poly, w, h)
                got = annotation_to_mask(ann["segmentation"], h, w)
                iou = (got & want).sum() / (got | want).sum()
                assert iou >= 0.95, iou
                x0, y0 = poly.min(0)
                assert np.allclose(ann["bbox"], [x0, y0, *(poly.max(0) - poly.min(0))], atol=0.01)
                n_checked += 1
    assert n_checked >= 3


@pytest.mark.parametrize("layout", ["images_first", "split_first"])
def test_yolo_detect_round_trip(tmp_path: Path, layout: str) -> None:
    truth = make_yolo(tmp_path / "src", layout, "list", "det", True, seed=1)
    out = yolo_to_coco(tmp_path / "src" / "data.yaml", tmp_path / "out")
    for split in ("train", "val"):
        data = _load(out, split)
        for im in data["images"]:
            anns = [a for a in data["annotations"] if a["image_id"] == im["id"]]
            objs = truth[(split, im["file_name"])]
            assert len(anns) == len(objs)
            for ann, (cls, (x0, y0, x1, y1)) in zip(anns, objs, strict=True):
                assert ann["box_only"] is True and ann["segmentation"] == []
                assert ann["category_id"] == cls + 1
                assert np.allclose(ann["bbox"], [x0, y0, x1 - x0, y1 - y0], atol=0.01)
                assert ann["area"] == pytest.approx(ann["bbox"][2] * ann["bbox"][3])


def test_unlabelled_images_are_kept(tmp_path: Path) -> None:
    make_yolo(tmp_path / "src", "images_first", "list", "seg", True)
    data = _load(yolo_to_coco(tmp_path / "src", tmp_path / "out"), "train")
    annotated = {a["image_id"] for a in data["annotations"]}
    assert [im["file_name"] for im in data["images"] if im["id"] not in annotated] == ["img2.png"]


@pytest.mark.parametrize(
    ("line", "match"),
    [("0 0.5 0.5 0.2", "got 4 values"), ("7 0.5 0.5 0.2 0.2", "class '7'"), ("0 a 0.5 0.2 0.2", "non-numeric"),
     ("1 0.5 0.5 1.7 0.2", r"normalised to \[0, 1\]"), ("0.5 0.5 0.5 0.2 0.2", "not an integer")],
)
def test_malformed_label_names_file_and_line(tmp_path: Path, line: str, match: str) -> None:
    make_yolo(tmp_path / "src", "images_first", "list", "det", True)
    label = tmp_path / "src" / "labels" / "train" / "img0.txt"
    label.write_text("0 0.5 0.5 0.2 0.2\n\n" + line + "\n")
    with pytest.raises(DatasetProblems, match=match) as err:
        yolo_to_coco(tmp_path / "src", tmp_path / "out")
    assert [i.file for i in err.value.issues] == [f"{label}:3"]
    assert not (tmp_path / "out").exists()


def test_every_bad_line_and_orphan_label_is_reported(tmp_path: Path) -> None:
    """Bad lines in two files and a label file with no image: all listed at once, nothing written."""
    make_yolo(tmp_path / "src", "images_first", "list", "det", True)
    labels = tmp_path / "src" / "labels"
    (labels / "train" / "img0.txt").write_text("9 0.5 0.5 0.2 0.2\n0 0.5 0.5 0.2 0.2\n0 x 0.5 0.2 0.2\n")
    (labels / "val" / "img0.txt").write_text("0 0.5 0.5 0 0.2\n")
    (labels / "val" / "nobody.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    with pytest.raises(DatasetProblems) as err:
        yolo_to_coco(tmp_path / "src", tmp_path / "out")
    assert [(i.split, i.file) for i in err.value.issues] == [
        ("train", f"{labels / 'train' / 'img0.txt'}:1"), ("train", f"{labels / 'train' / 'img0.txt'}:3"),
        ("val", f"{labels / 'val' / 'img0.txt'}:1"), ("val", str(labels / "val" / "nobody.txt"))]
    assert "label file has no image" in err.value.issues[-1].message
    assert not (tmp_path / "out").exists()


def test_bad_yaml_and_missing_splits(tmp_path: Path) -> None:
    make_yolo(tmp_path / "src", "images_first", "list", "det", True)
    (tmp_path / "src" / "data.yaml").write_text(yaml.safe_dump({"names": NAMES, "nc": 2}))
    with pytest.raises(DataError, match="'nc' is 2") as err:
        yolo_to_coco(tmp_path / "src", tmp_path / "out")
    assert err.value.path.endswith("data.yaml")
    (tmp_path / "src" / "data.yaml").write_text(yaml.safe_dump({"names": NAMES, "train": "nowhere/train"}))
    with pytest.raises(DataError, match="'nowhere/train' not found"):
        yolo_to_coco(tmp_path / "src", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no data.yaml"):
        yolo_to_coco(tmp_path / "empty", tmp_path / "out")
