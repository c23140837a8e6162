"""sam3lora-eval: AP equals pycocotools on the written detections, cgF1 / IoU equal the accumulators, the CLI."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from rich.console import Console
from torchvision.ops import box_convert

from sam3lora.adapter import save_adapter
from sam3lora.config import defaults
from sam3lora.data.readers import CocoReader
from sam3lora.data.synthetic_shapes import write_synthetic
from sam3lora.inference import Sam3LoRAPredictor
from sam3lora.inference.run_eval import run
from sam3lora.lora import apply_lora
from sam3lora.metrics import CgF1Accumulator, MatchedIoUDice
from sam3lora.model import load_model

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def make_adapter(path: Path) -> Path:
    """A random-B LoRA adapter for the tiny preset (its outputs differ from the base)."""
    model, _ = load_model("tiny", dtype="float32", seed=0)
    torch.manual_seed(1)
    settings = defaults(
        "lora/_base", init=False, rank=4, alpha=16, detr_decoder={"enabled": True}, mask_decoder={"enabled": True}
    )
    save_adapter(apply_lora(model, settings), path, settings)
    return path


def _midpoint_threshold(values: list[float]) -> float:
    """A threshold between two distinct middle values (so some pairs keep predictions and others do not)."""
    v = np.unique(np.round(values, 6))
    i = len(v) // 2
    return float((v[i - 1] + v[i]) / 2)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Synthetic val images; split ``oracle`` adds, as the first category's GT, the base model's best mask on each
    image (so the untrained tiny model has a non-zero AP) to the real annotations of the other categories."""
    root = write_synthetic(tmp_path_factory.mktemp("data") / "syn", train=4, val=4, size=224)
    val = json.loads((root / "val" / "annotations.json").read_text())
    names = [c["name"] for c in sorted(val["categories"], key=lambda c: c["id"])]
    first = min(c["id"] for c in val["categories"])
    predictor = Sam3LoRAPredictor.from_pretrained("tiny")
    paths = [root / "val" / "images" / im["file_name"] for im in val["images"]]
    results = predictor.predict(paths, text=names, threshold=0.0)
    annotations = [a for a in val["annotations"] if a["category_id"] != first]
    for image, per_prompt in zip(val["images"], results, strict=True):
        best = per_prompt[0]
        k = next(i for i in range(len(best)) if best.masks[i].any())
        rle = mask_utils.encode(np.asfortranarray(best.masks[k].numpy().astype(np.uint8)))
        rle["counts"] = rle["counts"].decode()
        annotations.append({
            "id": 10_000 + image["id"], "image_id": image["id"], "category_id": first, "segmentation": rle,
            "area": float(mask_utils.area(rle)), "bbox": box_convert(best.boxes[k], "xyxy", "xywh").tolist(),
            "iscrowd": 0,
        })
    (root / "oracle").mkdir()
    shutil.copytree(root / "val" / "images", root / "oracle" / "images")
    (root / "oracle" / "annotations.json").write_text(json.dumps({**val, "annotations": annotations}))
    max_scores = [float(r.scores.max()) for per_prompt in results for r in per_prompt]
    return root, _midpoint_threshold(max_scores)


def coco_stats(gt_file: Path, detections: Path, iou_type: str) -> list[float]:
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_file))
        ev = COCOeval(gt, gt.loadRes(str(detections)), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [float(s) for s in ev.stats[:3]]


def test_eval_metrics_equal_pycocotools_and_the_accumulators(dataset, tmp_path):
    root, threshold = dataset
    adapter = make_adapter(tmp_path / "adapter")
    gt_file = root / "oracle" / "annotations.json"
    before = gt_file.read_bytes()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("eval", overrides=[
            f"data.root={root}", "data.split=oracle", f"adapters={{finetuned:{adapter}}}", "device=cpu",
            f"score_threshold={threshold}", f"paths.output_dir={tmp_path / 'out'}",
        ])
    report = run(cfg, console=Console(file=io.StringIO()))
    out = tmp_path / "out"
    assert gt_file.read_bytes() == before  # the dataset is not modified
    assert list(report["models"]) == ["base", "finetuned"]
    assert json.loads((out / "metrics.json").read_text())["models"] == report["models"]
    table = (out / "metrics.md").read_text()
    assert "| base |" in table and "| finetuned |" in table and "cgF1" in table
    assert (out / "metrics.png").read_bytes()[:4] == b"\x89PNG"

    reader = CocoReader(root, "oracle")
    categories = dict(reader.categories())
    predictor = Sam3LoRAPredictor.from_pretrained("tiny", {"finetuned": adapter}, merge=False)
    for name, adapter_name in (("base", None), ("finetuned", "finetuned")):
        metrics = report["models"][name]["metrics"]
        detections = out / report["models"][name]["detections"]
        for iou_type, key in (("bbox", "bbox"), ("segm", "segm")):
            expected = coco_stats(gt_file, detections, iou_type)
            got = [metrics[f"{key}_AP"], metrics[f"{key}_AP50"], metrics[f"{key}_AP75"]]
            assert got == pytest.approx(expected, abs=1e-12), (name, iou_type)
        # cgF1 and matched IoU/Dice recomputed from the predictor's own output at the original resolution
        cgf1, iou_dice = CgF1Accumulator(threshold), MatchedIoUDice(threshold)
        records = list(reader.images())
        results = predictor.predict(
            [r.path for r in records], text=[p[0] for p in categories.values()], threshold=threshold,
            adapter=adapter_name,
        )
        for record, per_prompt in zip(records, results, strict=True):
            instances = reader.instances(record)
            for category_id, result in zip(categories, per_prompt, strict=True):
                gt = [torch.from_numpy(i.mask) for i in instances if i.category_id == category_id]
                gt_masks = torch.stack(gt).bool() if gt else torch.zeros(0, record.height, record.width, dtype=bool)
                cgf1.update(result.masks, result.scores, gt_masks)
                iou_dice.update(result.masks, result.scores, gt_masks)
        expected_cg = cgf1.compute()
        for key in ("cgF1", "IL_MCC", "pmF1"):
            assert metrics[key] == pytest.approx(expected_cg[key], abs=1e-9), (name, key)
        expected_iou = iou_dice.compute()
        assert metrics["iou"] == pytest.approx(expected_iou["iou"], abs=1e-9)
        assert metrics["dice"] == pytest.approx(expected_iou["dice"], abs=1e-9)
    base = report["models"]["base"]["metrics"]
    assert base["segm_AP"] > 0.05 and base["bbox_AP"] > 0.05  # the oracle GT makes AP non-trivial
    assert 0 < base["num_pairs"] == 4 * len(categories)
    assert base["IL_MCC"] != 0.0 or base["cgF1"] != 0.0 or base["iou"] > 0


def run_cli(monkeypatch, *overrides: str) -> tuple[int, str]:
    from sam3lora.cli.eval import main

    err = io.StringIO()
    monkeypatch.setattr(sys, "argv", ["sam3lora-eval", *overrides])
    code = 0
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            main()
        except SystemExit as exit_:
            code = int(exit_.code or 0)
    return code, err.getvalue()


def test_cli_with_a_list_of_adapters_and_errors(dataset, tmp_path, monkeypatch):
    root, _ = dataset
    adapter = make_adapter(tmp_path / "runs" / "r1" / "adapter")
    run_dir = tmp_path / "run"
    code, stderr = run_cli(
        monkeypatch, f"data.root={root}", "data.split=val", f"adapters=[{adapter}]", "include_base=false",
        "limit=2", "device=cpu", f"hydra.run.dir={run_dir}",
    )
    assert code == 0, stderr
    report = json.loads((run_dir / "metrics.json").read_text())
    assert list(report["models"]) == ["r1-adapter"] and report["data"]["images"] == 2
    assert report["models"]["r1-adapter"]["metrics"]["num_pairs"] == 2 * len(report["data"]["categories"])
    assert (run_dir / "detections" / "r1-adapter.json").is_file()

    code, stderr = run_cli(
        monkeypatch, f"data.root={root}", f"adapters={{x:{tmp_path / 'missing'}}}", f"hydra.run.dir={tmp_path / 'r2'}"
    )
    assert code == 2
    line = stderr.strip().splitlines()[-1]
    assert "adapters.x" in line and "missing" in line and "Traceback" not in stderr

    code, stderr = run_cli(monkeypatch, f"data.root={tmp_path / 'nodata'}", f"hydra.run.dir={tmp_path / 'r3'}")
    assert code == 2 and "annotations.json" in stderr
