"""Tests for sam3lora.data.validate: each listed problem is caught and names its file."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from sam3lora.data.synthetic_shapes import write_synthetic
from sam3lora.data.validate import print_report
from sam3lora.data.validate_dataset import validate_dataset

S = 32
POLY = [4.0, 4.0, 20.0, 4.0, 20.0, 20.0, 4.0, 20.0]


def _base() -> dict:
    return {
        "images": [{"id": 1, "file_name": "a.png", "width": S, "height": S},
                   {"id": 2, "file_name": "b.png", "width": S, "height": S}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "segmentation": [POLY], "bbox": [4, 4, 16, 16],
             "area": 256.0, "iscrowd": 0},
            {"id": 2, "image_id": 2, "category_id": 2, "segmentation": [POLY], "bbox": [4, 4, 16, 16],
             "area": 256.0, "iscrowd": 0},
        ],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
    }


def _write(root: Path, data: dict) -> Path:
    for split in ("train", "val"):
        (root / split / "images").mkdir(parents=True)
        for name in ("a.png", "b.png"):
            Image.fromarray(np.zeros((S, S, 3), np.uint8)).save(root / split / "images" / name)
        (root / split / "annotations.json").write_text(json.dumps(data if split == "train" else _base()))
    return root


def _ann(**kw: object) -> Callable[[dict, Path], None]:
    def f(d: dict, root: Path) -> None:
        d["annotations"][0].update(kw)
    return f


def _missing_image(d: dict, root: Path) -> None:
    (root / "train" / "images" / "a.png").unlink()


def _unreadable(d: dict, root: Path) -> None:
    (root / "train" / "images" / "a.png").write_bytes(b"not an image at all")


def _truncated(d: dict, root: Path) -> None:
    """A PNG cut in half: its header (and so its size) reads fine, only a whole decode finds it."""
    path = root / "train" / "images" / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (S, S, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _size(d: dict, root: Path) -> None:
    d["images"][0]["width"] = 40


def _dup(key: str) -> Callable[[dict, Path], None]:
    def f(d: dict, root: Path) -> None:
        d[key].append(copy.deepcopy(d[key][0]))
        if key == "categories":
            d[key][-1]["name"] = "bird"
    return f


CASES = [
    (_missing_image, "a.png", "image file not found"),
    (_unreadable, "a.png", "cannot decode image file"),
    (_truncated, "a.png", "image file is truncated"),
    (_size, "a.png", "image is 32x32 but the annotations say 40x32"),
    (_ann(segmentation=[[1.0, 1.0, 5.0, 5.0]]), "annotations.json", "degenerate polygon 0: 4 coordinates"),
    (_ann(segmentation=[[1.0, 1.0, 5.0, 5.0, 9.0, 9.0]]), "annotations.json", "degenerate polygon 0: zero area"),
    (_ann(bbox=[4, 4, 0, 16]), "annotations.json", "degenerate box"),
    (_ann(bbox=[4, 4, 16, -2]), "annotations.json", "degenerate box"),
    (_ann(segmentation=[[4.0, 4.0, 40.0, 4.0, 40.0, 20.0]]), "annotations.json", "polygon 0 outside"),
    (_ann(bbox=[20, 20, 14, 10]), "annotations.json", "box [20, 20, 14, 10] outside"),
    (_ann(category_id=9), "annotations.json", "unknown category id 9"),
    (_ann(image_id=77), "annotations.json", "missing image id 77"),
    (_dup("images"), "annotations.json", "duplicate image id(s) [1]"),
    (_dup("annotations"), "annotations.json", "duplicate annotation id(s) [1]"),
    (_dup("categories"), "annotations.json", "duplicate category id(s) [1]"),
    (_ann(segmentation={"size": [S, S], "counts": [5, 3]}), "annotations.json", "bad segmentation"),
]


@pytest.mark.parametrize(("breaker", "file", "message"), CASES, ids=[c[2] for c in CASES])
def test_catches_problem_and_names_file(tmp_path: Path, breaker: Callable, file: str, message: str) -> None:
    data = _base()
    root = _write(tmp_path / "ds", data)
    breaker(data, root)
    (root / "train" / "annotations.json").write_text(json.dumps(data))
    report = validate_dataset(root)
    assert not report.ok
    hits = [e for e in report.errors if message in e.message]
    assert hits, [str(e) for e in report.errors]
    assert all(e.split == "train" and Path(e.file).name == file for e in hits)
    assert all(e.split == "train" for e in report.errors), "the clean val split must have no errors"


def test_tolerance_of_one_pixel(tmp_path: Path) -> None:
    data = _base()
    data["annotations"][0]["bbox"] = [-0.5, 0, S + 0.9, S]
    data["annotations"][0]["segmentation"] = [[-0.5, 0.0, S + 0.9, 0.0, S + 0.9, S + 0.5]]
    report = validate_dataset(_write(tmp_path / "ds", data))
    assert report.ok, [str(e) for e in report.errors]


def test_warnings_and_counts(tmp_path: Path) -> None:
    data = _base()
    data["annotations"] = [dict(data["annotations"][0], segmentation=[], box_only=True)]
    data["categories"].append({"id": 3, "name": "bird"})
    report = validate_dataset(_write(tmp_path / "ds", data))
    assert report.ok
    texts = {(w.split, w.id, w.message) for w in report.warnings}
    assert ("train", 1, "box-only annotation (no mask)") in texts
    assert ("train", 2, "image has no annotation") in texts
    assert ("train", 2, "category 'dog' has no instances") in texts
    assert ("train", 3, "category 'bird' has no instances") in texts
    c = report.counts["train"]
    assert (c.images, c.instances, c.box_only, c.images_without_annotations) == (2, 1, 1, 1)
    assert c.per_category == {"cat": 1, "dog": 0, "bird": 0}


def test_bad_json_and_missing_dataset(tmp_path: Path) -> None:
    root = _write(tmp_path / "ds", _base())
    (root / "val" / "annotations.json").write_text("{oops")
    report = validate_dataset(root)
    assert [(e.split, Path(e.file).name) for e in report.errors] == [("val", "annotations.json")]
    assert "invalid JSON" in report.errors[0].message
    assert not validate_dataset(tmp_path / "nope").ok


def test_clean_synthetic_set_has_no_errors(tmp_path: Path) -> None:
    root = write_synthetic(tmp_path / "syn", train=4, val=2, size=64, seed=1)
    report = validate_dataset(root)
    assert report.ok, [str(e) for e in report.errors]
    assert report.counts["train"].images == 4 and report.counts["train"].instances > 0
    console = Console(record=True, width=120)
    print_report(report, console)
    assert "OK" in console.export_text()


def test_stats_agree_with_validate_counts(tmp_path: Path) -> None:
    from sam3lora.data.stats import dataset_stats

    root = write_synthetic(tmp_path / "syn", train=5, val=2, size=64, seed=2)
    report = validate_dataset(root)
    stats = dataset_stats(root)
    for split in ("train", "val"):
        data = json.loads((root / split / "annotations.json").read_text())
        rows = {r.name: r for r in stats[split]}
        assert {n: r.instances for n, r in rows.items()} == report.counts[split].per_category
        for cat in data["categories"]:
            anns = [a for a in data["annotations"] if a["category_id"] == cat["id"]]
            r = rows[cat["name"]]
            assert r.images == len({a["image_id"] for a in anns}) and r.box_only == 0
            want = np.mean([a["area"] / 64 ** 2 for a in anns]) if anns else 0.0
            assert r.mean_area_fraction == pytest.approx(want)


def _roboflow_export(root: Path) -> None:
    """Roboflow COCO export: ``train/`` and ``valid/`` each holding ``_annotations.coco.json`` beside the images."""
    for disk in ("train", "valid"):
        (root / disk).mkdir(parents=True)
        for name in ("a.png", "b.png"):
            Image.fromarray(np.zeros((S, S, 3), np.uint8)).save(root / disk / name)
        (root / disk / "_annotations.coco.json").write_text(json.dumps(_base()))


def test_roboflow_export_is_validated_and_every_problem_listed(tmp_path: Path) -> None:
    root = tmp_path / "rf"
    _roboflow_export(root)
    report = validate_dataset(root)
    assert report.ok and report.layout == "coco" and set(report.counts) == {"train", "val"}
    data = _base()
    data["annotations"][0]["category_id"] = 9
    data["annotations"][1]["bbox"] = [20, 20, 30, 30]
    (root / "valid" / "_annotations.coco.json").write_text(json.dumps(data))
    (root / "train" / "b.png").unlink()
    report = validate_dataset(root)
    ann = str(root / "valid" / "_annotations.coco.json")
    assert sorted((e.split, e.file, e.id, e.message) for e in report.errors) == [
        ("train", str(root / "train" / "b.png"), 2, "image file not found"),
        ("val", ann, 1, "unknown category id 9"),
        ("val", ann, 2, "box [20, 20, 30, 30] outside the 32x32 image"),
    ]
    assert [e.sample for e in sorted(report.errors, key=lambda e: (e.split, e.id))] == [2, 1, 2]


def test_yolo_dataset_is_validated(tmp_path: Path) -> None:
    import yaml

    root = tmp_path / "yolo"
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        Image.fromarray(np.zeros((S, S, 3), np.uint8)).save(root / "images" / split / "a.jpg")
        (root / "labels" / split / "a.txt").write_text("0 0.5 0.5 0.25 0.25\n")
    (root / "data.yaml").write_text(yaml.safe_dump({"names": ["cat"]}))
    report = validate_dataset(root)
    assert report.ok and report.layout == "yolo" and report.counts["val"].box_only == 1
    (root / "labels" / "val" / "a.txt").write_text("0 0.5 0.5 0.25 0.25\n3 0.5 0.5 0.25 0.25\n")
    (root / "labels" / "train" / "lost.txt").write_text("0 0.5 0.5 0.25 0.25\n")
    report = validate_dataset(root)
    assert sorted(e.file for e in report.errors) == [str(root / "labels" / "train" / "lost.txt"),
                                                     f"{root / 'labels' / 'val' / 'a.txt'}:2"]
