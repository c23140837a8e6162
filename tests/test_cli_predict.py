"""sam3lora-predict: a folder with a corrupt image, COCO output that matches the predictor, usage errors."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from sam3lora.cli.predict import main
from sam3lora.inference import Sam3LoRAPredictor

THRESHOLD = "0.25"  # the untrained tiny model scores about 0.25: keep some instances, not all


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for name, (h, w) in {"a.png": (80, 120), "b.jpg": (100, 90)}.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / name)
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    (root / "notes.txt").write_text("ignored: not an image extension")
    return root


def run_cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def test_folder_with_a_corrupt_image(folder, tmp_path):
    before = sorted(p.name for p in folder.iterdir())
    out = tmp_path / "preds"
    code, stdout, stderr = run_cli(
        str(folder), "--text", "red circle", "--text", "blue square", "--base", "tiny", "--out", str(out),
        "--threshold", THRESHOLD, "--save-masks", "--device", "cpu",
    )
    assert code == 1
    assert "broken.png" in stderr and "cannot decode" in stderr
    assert "Traceback" not in stderr
    assert "2 image(s) done, 1 failed" in stdout
    assert sorted(p.name for p in (out / "overlays").iterdir()) == ["a.png", "b.png"]
    assert sorted(p.name for p in folder.iterdir()) == before  # the input folder is untouched
    overlay = Image.open(out / "overlays" / "b.png")
    assert overlay.size == (90, 100)

    doc = json.loads((out / "predictions.json").read_text())
    assert [c["name"] for c in doc["categories"]] == ["red circle", "blue square"]
    assert [Path(i["file_name"]).name for i in doc["images"]] == ["a.png", "b.jpg"]
    coco = COCO()
    coco.dataset = doc
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
        coco.loadRes(doc["annotations"])

    # the file holds exactly what the predictor finds, at the original resolution
    predictor = Sam3LoRAPredictor.from_pretrained("tiny")
    expected = predictor.predict(
        [folder / "a.png", folder / "b.jpg"], text=["red circle", "blue square"], threshold=float(THRESHOLD)
    )
    assert sum(len(r) for per_image in expected for r in per_image) == len(doc["annotations"]) > 0
    for image_meta, per_image in zip(doc["images"], expected, strict=True):
        for cid, result in enumerate(per_image, start=1):
            dets = [d for d in doc["annotations"] if d["image_id"] == image_meta["id"] and d["category_id"] == cid]
            assert len(dets) == len(result)
            scores = torch.tensor([d["score"] for d in dets])
            torch.testing.assert_close(scores, result.scores, atol=1e-5, rtol=0)
            if dets:
                decoded = torch.from_numpy(mask_utils.decode(dets[0]["segmentation"])).bool()
                assert decoded.shape == (image_meta["height"], image_meta["width"])
                assert (decoded != result.masks[0]).float().mean() < 1e-3
    n_masks = sum(1 for _ in (out / "masks").rglob("*.png"))
    assert n_masks == len(doc["annotations"])


def test_box_outside_one_image_fails_that_image_only(folder, tmp_path):
    # a.png is 120 x 80 and b.jpg 90 x 100 (W x H): the box fits a.png only
    code, stdout, stderr = run_cli(
        str(folder / "a.png"), str(folder / "b.jpg"), "--box", "50,10,110,60", "--base", "tiny",
        "--out", str(tmp_path / "p"), "--threshold", "1.0", "--device", "cpu",
    )
    assert code == 1
    assert "b.jpg" in stderr and "outside the image (90x100" in stderr
    assert [p.name for p in (tmp_path / "p" / "overlays").iterdir()] == ["a.png"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--text", "x", "--box", "1,2,3"], "expected four numbers"),
        (["--box", "5,5,2,9"], "reversed"),
        (["--text", "  "], "empty text prompt"),
        ([], "no prompt"),
    ],
)
def test_usage_errors_are_one_line_with_status_2(folder, tmp_path, args, message):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main([str(folder / "a.png"), "--base", "tiny", "--out", str(tmp_path / "o"), *args])
        except SystemExit as exit_:  # argparse exits for its own errors
            code = exit_.code
    text = err.getvalue().strip()
    assert code == 2
    assert message in text and "\n" not in text and "Traceback" not in text
    assert not (tmp_path / "o").exists()


def test_missing_input_and_nonempty_out(folder, tmp_path):
    code, _, stderr = run_cli(str(tmp_path / "nothing-here"), "--text", "a", "--base", "tiny", "--out", str(tmp_path))
    assert code == 2 and "nothing-here: no such file or folder" in stderr
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    code, _, stderr = run_cli(str(folder / "a.png"), "--text", "a", "--base", "tiny", "--out", str(tmp_path / "full"))
    assert code == 2 and "--overwrite" in stderr
    assert (tmp_path / "full" / "keep.txt").read_text() == "x"
