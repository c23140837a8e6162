"""End-to-end tests of the ``sam3lora-data`` CLI via ``main([...])``."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from sam3lora.cli.data import main


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _one_error_line(capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert "Traceback" not in err[0] and all(n in err[0] for n in needles), err[0]
    return err[0]


def test_synthetic_validate_stats(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "syn"
    args = ["synthetic", "--out", str(out), "--train", "3", "--val", "2", "--size", "64", "--seed", "4",
            "--categories", "red circle, blue square,green star"]
    assert main(args) == 0
    cats = json.loads((out / "train" / "annotations.json").read_text())["categories"]
    assert [c["name"] for c in cats] == ["red circle", "blue square", "green star"]
    assert len(list((out / "val" / "images").iterdir())) == 2
    before = _hashes(out)
    capsys.readouterr()

    assert main(args) == 2
    _one_error_line(capsys, str(out), "not empty")
    assert _hashes(out) == before
    assert main([*args[:-2], "--overwrite"]) == 0
    assert json.loads((out / "train" / "annotations.json").read_text())["categories"][0]["name"] == "red circle"

    assert main(["validate", str(out)]) == 0
    assert "OK" in capsys.readouterr().out
    png = tmp_path / "grid.png"
    assert main(["stats", str(out), "--png", str(png)]) == 0
    assert "red circle" in capsys.readouterr().out
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 100


def test_user_errors_exit_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["synthetic", "--out", str(tmp_path / "x"), "--categories", "red blob"]) == 2
    _one_error_line(capsys, "unknown shape 'blob'")
    assert main(["stats", str(tmp_path / "missing")]) == 2
    _one_error_line(capsys, "missing")
    assert main(["convert", "--from", "coco", "--src", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    _one_error_line(capsys, "nope", "not found")
    assert not (tmp_path / "x").exists() and not (tmp_path / "o").exists()


def test_validate_exit_1_on_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "syn"
    assert main(["synthetic", "--out", str(out), "--train", "2", "--val", "1", "--size", "64"]) == 0
    next((out / "train" / "images").iterdir()).unlink()
    assert main(["validate", str(out)]) == 1
    assert "image file not found" in capsys.readouterr().out


def _make_yolo(src: Path) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        (src / split / "images").mkdir(parents=True)
        (src / split / "labels").mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(src / split / "images" / f"{i}.png")
            (src / split / "labels" / f"{i}.txt").write_text("0 0.1 0.1 0.5 0.1 0.3 0.6\n1 0.5 0.5 0.2 0.4\n")
    (src / "data.yaml").write_text(yaml.safe_dump({"names": {0: "cat", 1: "dog"}}))


def _make_coco(src: Path) -> None:
    rng = np.random.default_rng(1)
    for split in ("train", "valid"):
        (src / split).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(src / split / "a.jpg")
        (src / split / "_annotations.coco.json").write_text(json.dumps({
            "images": [{"id": 0, "file_name": "a.jpg", "width": 64, "height": 48}],
            "annotations": [{"id": 0, "image_id": 0, "category_id": 1, "bbox": [2, 2, 10, 8], "area": 80,
                             "segmentation": [[2, 2, 12, 2, 12, 10, 2, 10]], "iscrowd": 0}],
            "categories": [{"id": 0, "name": "pets", "supercategory": "none"},
                           {"id": 1, "name": "cat", "supercategory": "pets"}],
        }))


@pytest.mark.parametrize("fmt", ["yolo", "coco"])
def test_convert_leaves_input_unchanged(tmp_path: Path, capsys: pytest.CaptureFixture[str], fmt: str) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    (_make_yolo if fmt == "yolo" else _make_coco)(src)
    before = _hashes(src)
    extra = []
    if fmt == "coco":
        (tmp_path / "prompts.yaml").write_text("cat: [cat, kitten]\n")
        extra = ["--prompts", str(tmp_path / "prompts.yaml")]
    assert main(["convert", "--from", fmt, "--src", str(src), "--out", str(out), *extra]) == 0
    assert _hashes(src) == before
    assert sorted(p.name for p in out.iterdir()) == [".sam3lora-converted", "train", "val"]
    err = capsys.readouterr().err
    if fmt == "coco":
        assert "warning:" in err and "'pets'" in err
        cats = json.loads((out / "val" / "annotations.json").read_text())["categories"]
        assert cats == [{"id": 1, "name": "cat", "supercategory": "pets", "prompts": ["cat", "kitten"]}]
    assert main(["validate", str(out)]) == 0
    assert main(["convert", "--from", fmt, "--src", str(src), "--out", str(out)]) == 2
    _one_error_line(capsys, "not empty")
    assert main(["convert", "--from", fmt, "--src", str(src), "--out", str(out), "--overwrite"]) == 0
    assert _hashes(src) == before


def _roboflow(src: Path, splits: tuple[str, ...] = ("train", "valid", "test")) -> dict[str, dict]:
    """A tiny Roboflow COCO export: ``SPLIT/_annotations.coco.json`` beside two JPEGs per split."""
    rng = np.random.default_rng(2)
    out = {}
    for split in splits:
        (src / split).mkdir(parents=True)
        images, anns = [], []
        for i in range(2):
            name = f"{split}_{i}.jpg"
            Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(src / split / name)
            images.append({"id": i, "file_name": name, "width": 64, "height": 48})
            anns.append({"id": i, "image_id": i, "category_id": 1, "bbox": [2, 2, 10, 8], "area": 80,
                         "segmentation": [[2, 2, 12, 2, 12, 10, 2, 10]], "iscrowd": 0})
        out[split] = {"images": images, "annotations": anns,
                      "categories": [{"id": 0, "name": "pets", "supercategory": "none"},
                                     {"id": 1, "name": "cat", "supercategory": "pets"}]}
        (src / split / "_annotations.coco.json").write_text(json.dumps(out[split]))
    return out


def _damage_roboflow(src: Path, data: dict[str, dict]) -> None:
    """Two problems in train (unknown category, box outside the image), one in valid (a truncated JPEG)."""
    train = data["train"]
    train["annotations"][0]["category_id"] = 9
    train["annotations"][1]["bbox"] = [40, 30, 60, 40]
    (src / "train" / "_annotations.coco.json").write_text(json.dumps(train))
    jpg = src / "valid" / "valid_1.jpg"
    jpg.write_bytes(jpg.read_bytes()[: jpg.stat().st_size // 2])


def test_validate_reads_roboflow_classic_and_yolo(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _roboflow(tmp_path / "rf")
    _make_yolo(tmp_path / "yolo")
    _make_coco(tmp_path / "rf2")
    classic = tmp_path / "classic"
    (classic / "annotations").mkdir(parents=True)
    (classic / "train2017").mkdir()
    Image.new("RGB", (64, 48)).save(classic / "train2017" / "a.png")
    (classic / "annotations" / "instances_train2017.json").write_text(json.dumps({
        "images": [{"id": 5, "file_name": "a.png", "width": 64, "height": 48}],
        "annotations": [{"id": 1, "image_id": 5, "category_id": 1, "bbox": [1, 1, 5, 5], "segmentation": []}],
        "categories": [{"id": 1, "name": "dot"}]}))
    for root in ("rf", "yolo", "rf2", "classic"):
        assert main(["validate", str(tmp_path / root)]) == 0, root
        out = capsys.readouterr().out
        assert "OK" in out and "no SPLIT/annotations.json" not in out
    assert main(["validate", "--from", "yolo", str(tmp_path / "yolo")]) == 0


def test_validate_lists_every_problem_of_a_roboflow_export(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "rf"
    _damage_roboflow(src, _roboflow(src))
    before = _hashes(src)
    assert main(["validate", str(src)]) == 1
    out = capsys.readouterr().out
    assert "3 error(s)" in out
    assert f"train: {src / 'train' / '_annotations.coco.json'} [id 0]: unknown category id 9" in out
    assert "[id 1]: box [40, 30, 60, 40] outside the 64x48 image" in out
    assert f"val: {src / 'valid' / 'valid_1.jpg'} [id 1]: image file is truncated" in out
    assert _hashes(src) == before


def test_convert_refuses_bad_coco_with_every_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, out = tmp_path / "rf", tmp_path / "out"
    data = _roboflow(src)
    _damage_roboflow(src, data)
    data["test"]["images"][1]["id"] = 0  # a duplicate image id, so annotation 1 names a missing image
    (src / "test" / "_annotations.coco.json").write_text(json.dumps(data["test"]))
    before = _hashes(src)
    assert main(["convert", "--from", "coco", "--src", str(src), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert all(line.startswith("error: ") for line in err) and "Traceback" not in "".join(err)
    problems, summary = err[:-1], err[-1]
    assert len(problems) == 5, err
    assert any("_annotations.coco.json [id 0]: unknown category id 9" in p for p in problems)
    assert any("[id 1]: box [40, 30, 60, 40] outside" in p for p in problems)
    assert any(f"{src / 'valid' / 'valid_1.jpg'} [id 1]: image file is truncated" in p for p in problems)
    assert any("test: " in p and "duplicate image id(s) [0]" in p for p in problems)
    assert any("test: " in p and "[id 1]: annotation points to missing image id 1" in p for p in problems)
    assert summary == f"error: {src}: 5 problem(s) in the COCO dataset; nothing written"
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["rf"]
    assert _hashes(src) == before


def test_convert_refuses_yolo_orphan_labels_and_bad_lines(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    src, out = tmp_path / "yolo", tmp_path / "out"
    _make_yolo(src)
    (src / "train" / "labels" / "ghost.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    (src / "val" / "labels" / "1.txt").write_text("0 0.5 0.5 0.2 0.2\n5 0.5 0.5 0.2 0.2\n0 0.5 0.5 0.2\n")
    before = _hashes(src)
    assert main(["convert", "--from", "yolo", "--src", str(src), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4, err
    assert f"{src / 'train' / 'labels' / 'ghost.txt'}: label file has no image" in err[0]
    assert f"{src / 'val' / 'labels' / '1.txt'}:2: class '5' is not an integer in 0..1" in err[1]
    assert f"{src / 'val' / 'labels' / '1.txt'}:3: expected 'cls cx cy w h'" in err[2]
    assert err[3] == f"error: {src}: 3 problem(s) in the YOLO dataset; nothing written"
    assert not out.exists() and _hashes(src) == before
    assert main(["validate", str(src)]) == 1
    assert "label file has no image" in capsys.readouterr().out


@pytest.mark.parametrize("fmt", ["yolo", "coco"])
def test_convert_overwrite_never_replaces_a_directory_it_did_not_write(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fmt: str
) -> None:
    src, out = tmp_path / "src", tmp_path / "mine"
    (_make_yolo if fmt == "yolo" else _make_coco)(src)
    out.mkdir()
    (out / "precious.txt").write_text("a dataset of mine")
    assert main(["convert", "--from", fmt, "--src", str(src), "--out", str(out), "--overwrite"]) == 2
    _one_error_line(capsys, str(out), "not written by sam3lora", "never replaced")
    assert [p.name for p in out.iterdir()] == ["precious.txt"]
    fresh = tmp_path / "fresh"
    assert main(["convert", "--from", fmt, "--src", str(src), "--out", str(fresh)]) == 0
    marker = json.loads((fresh / ".sam3lora-converted").read_text())
    assert marker["format"] == fmt
    assert main(["convert", "--from", fmt, "--src", str(src), "--out", str(fresh), "--overwrite"]) == 0
