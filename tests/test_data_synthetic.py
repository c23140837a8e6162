"""Tests for sam3lora.data.synthetic_shapes.write_synthetic."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from sam3lora.data.data_error import DataError
from sam3lora.data.masks import annotation_to_mask
from sam3lora.data.synthetic_shapes import COLOURS, DEFAULT_CATEGORIES, parse_categories, write_synthetic

SIZE = 96


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic(tmp_path_factory.mktemp("s") / "ds", train=12, val=4, size=SIZE, seed=3)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _load(root: Path, split: str) -> dict:
    return json.loads((root / split / "annotations.json").read_text())


def test_deterministic_per_seed(tmp_path: Path) -> None:
    a = write_synthetic(tmp_path / "a", train=3, val=2, size=64, seed=7)
    b = write_synthetic(tmp_path / "b", train=3, val=2, size=64, seed=7)
    c = write_synthetic(tmp_path / "c", train=3, val=2, size=64, seed=8)
    assert _files(a) == _files(b)
    assert _files(a) != _files(c)


def test_layout(synth: Path) -> None:
    assert sorted(p.name for p in synth.iterdir()) == [".sam3lora-synthetic", "train", "val"]
    for split, n in (("train", 12), ("val", 4)):
        data = _load(synth, split)
        assert len(data["images"]) == n
        names = sorted(p.name for p in (synth / split / "images").iterdir())
        assert names == sorted(im["file_name"] for im in data["images"])
        for im in data["images"]:
            with Image.open(synth / split / "images" / im["file_name"]) as pil:
                assert pil.mode == "RGB" and pil.size == (im["width"], im["height"]) == (SIZE, SIZE)
        assert [c["name"] for c in data["categories"]] == list(DEFAULT_CATEGORIES)
        assert all(a["iscrowd"] == 0 for a in data["annotations"])
    assert 4 <= len(DEFAULT_CATEGORIES) <= 6
    assert not list(synth.parent.glob(".ds.*")), "temp directory left behind"


def test_polygon_masks_match_bbox_area_and_colour(synth: Path) -> None:
    for split in ("train", "val"):
        data = _load(synth, split)
        images = {im["id"]: im for im in data["images"]}
        cats = {c["id"]: c["name"] for c in data["categories"]}
        assert data["annotations"]
        for ann in data["annotations"]:
            im = images[ann["image_id"]]
            mask = annotation_to_mask(ann["segmentation"], im["height"], im["width"])
            ys, xs = np.nonzero(mask)
            bbox = [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert np.allclose(ann["bbox"], bbox), (ann["id"], ann["bbox"], bbox)
            assert ann["area"] == mask.sum() >= 20
            pixels = np.asarray(Image.open(synth / split / "images" / im["file_name"]))[mask]
            colour = np.array(COLOURS[cats[ann["category_id"]].split()[0]])
            err = np.abs(np.median(pixels, axis=0) - colour).max()
            assert err < 45, (ann["id"], cats[ann["category_id"]], err)


def test_negatives_and_touching_objects(synth: Path) -> None:
    data = _load(synth, "train")
    all_cats = {c["id"] for c in data["categories"]}
    per_image: dict[int, list[dict]] = {im["id"]: [] for im in data["images"]}
    for ann in data["annotations"]:
        per_image[ann["image_id"]].append(ann)
    assert any({a["category_id"] for a in anns} < all_cats for anns in per_image.values())
    assert {a["category_id"] for a in data["annotations"]} == all_cats
    touching = 0
    kernel = np.ones((3, 3), np.uint8)
    for anns in per_image.values():
        masks = [annotation_to_mask(a["segmentation"], SIZE, SIZE) for a in anns]
        for i in range(len(masks)):
            grown = cv2.dilate(masks[i].astype(np.uint8), kernel).astype(bool)
            for j in range(i + 1, len(masks)):
                assert not (masks[i] & masks[j]).any(), "visible masks must not overlap"
                touching += int((grown & masks[j]).any())
    assert touching >= 2


@pytest.mark.parametrize(
    ("names", "match"),
    [(["red blob"], "unknown shape 'blob'"), (["teal circle"], "unknown colour 'teal'"),
     (["red"], "<colour> <shape>"), (["red circle", "Red  Circle"], "given twice")],
)
def test_bad_categories(tmp_path: Path, names: list[str], match: str) -> None:
    with pytest.raises(DataError, match=match):
        write_synthetic(tmp_path / "x", train=1, val=1, size=64, categories=names)
    assert not (tmp_path / "x").exists()


def test_custom_categories_and_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    write_synthetic(out, train=2, val=1, size=64, categories=["Cyan Hexagon", "orange cross"])
    assert [c["name"] for c in _load(out, "train")["categories"]] == ["cyan hexagon", "orange cross"]
    with pytest.raises(DataError, match="not empty"):
        write_synthetic(out, train=1, val=1, size=64)
    write_synthetic(out, train=1, val=1, size=64, overwrite=True)
    assert len(_load(out, "train")["images"]) == 1
    assert [c.shape for c in parse_categories("red ring, blue star")] == ["ring", "star"]
