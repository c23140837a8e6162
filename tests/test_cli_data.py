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
    assert "missing image" in capsys.readouterr().out


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
    assert sorted(p.name for p in out.iterdir()) == ["train", "val"]
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
