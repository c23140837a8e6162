"""sam3lora-export: merged directories that plain transformers loads, from adapter dirs and checkpoints; errors."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json

import pytest
import torch
from conftest import make_inputs
from test_predictor import make_adapter, make_checkpoint
from transformers import Sam3Model, Sam3Processor

from sam3lora.cli.export import main


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    peft_model = make_adapter(root / "adapter", seed=5)
    make_checkpoint(root / "last.ckpt", peft_model)
    return root, peft_model


def run_cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exit_:  # argparse's own usage errors
            code = int(exit_.code or 0)
    return code, out.getvalue(), err.getvalue()


def outputs(model, processor, boxes: bool):
    inputs = make_inputs(processor, rows=2, boxes=boxes, seed=3)
    with torch.no_grad():
        out = model(**inputs)
    return out.pred_logits, out.pred_boxes, out.pred_masks


@pytest.mark.parametrize("source", ["adapter", "last.ckpt"])
def test_round_trip_loads_with_plain_transformers(adapter, tmp_path, source):
    root, peft_model = adapter
    out = tmp_path / "merged"
    code, stdout, stderr = run_cli("--base", "tiny", "--adapter", str(root / source), "--out", str(out))
    assert code == 0, stderr
    assert "wrote" in stdout
    merged = Sam3Model.from_pretrained(out).eval()
    processor = Sam3Processor.from_pretrained(out)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    expected = outputs(peft_model, processor, boxes=True)  # text + exemplar boxes: every component runs
    got = outputs(merged, processor, boxes=True)
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=0)
    with peft_model.disable_adapter():
        base = outputs(peft_model, processor, boxes=True)
    assert not torch.allclose(got[0], base[0], atol=1e-4)  # the adapter really is in the weights


def test_bf16_and_refusals(adapter, tmp_path):
    root, _ = adapter
    out = tmp_path / "m"
    code, _, stderr = run_cli(
        "--base", "tiny", "--adapter", str(root / "adapter"), "--out", str(out), "--dtype", "bf16"
    )
    assert code == 0, stderr
    assert next(Sam3Model.from_pretrained(out, dtype="auto").parameters()).dtype == torch.bfloat16
    stamp = (out / "config.json").stat().st_mtime_ns

    code, _, stderr = run_cli("--base", "tiny", "--adapter", str(root / "adapter"), "--out", str(out))
    assert code == 2 and "--overwrite" in stderr and (out / "config.json").stat().st_mtime_ns == stamp
    code, _, stderr = run_cli("--base", "tiny", "--adapter", str(root / "adapter"), "--out", str(out), "--overwrite")
    assert code == 0 and next(Sam3Model.from_pretrained(out, dtype="auto").parameters()).dtype == torch.float32

    code, _, stderr = run_cli("--base", "tiny", "--adapter", str(tmp_path / "none"), "--out", str(tmp_path / "x"))
    expected = f"sam3lora-export: error: {tmp_path / 'none'}: no such adapter directory or checkpoint file"
    assert code == 2 and stderr.strip().splitlines() == [expected]
    assert not (tmp_path / "x").exists()

    other = tmp_path / "other"
    make_adapter(other, seed=6, base_seed=1)  # trained on another tiny base
    code, _, stderr = run_cli("--base", "tiny", "--adapter", str(other), "--out", str(tmp_path / "y"))
    assert code == 2 and "other base weights" in stderr and "Traceback" not in stderr

    code, _, stderr = run_cli("--base", "tiny", "--out", str(tmp_path / "z"))
    assert code == 2 and "--adapter" in stderr


def test_onnx_without_the_onnx_package_is_a_one_line_error(adapter, tmp_path, monkeypatch):
    root, _ = adapter
    out = tmp_path / "onnx"
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else find_spec(name, *a))
    code, _, stderr = run_cli("--base", "tiny", "--adapter", str(root / "adapter"), "--out", str(out), "--onnx")
    assert code == 2 and "pip install 'onnx" in stderr and "Traceback" not in stderr and not out.exists()


def test_onnx(adapter, tmp_path):
    pytest.importorskip("onnx", reason="pip install -e '.[onnx]' (part of .[dev])")
    root, peft_model = adapter
    out = tmp_path / "onnx"
    code, stdout, stderr = run_cli("--base", "tiny", "--adapter", str(root / "adapter"), "--out", str(out), "--onnx")
    assert code == 0, stderr
    info = json.loads((out / "onnx.json").read_text())
    assert (out / "model.onnx").stat().st_size > 0 and info["inputs"]["input_boxes"] == [1, 1, 4]
    Sam3Model.from_pretrained(out)  # the transformers directory is there too
    if importlib.util.find_spec("onnxruntime") is None:
        assert "not verified" in stdout
        return
    import onnxruntime as ort

    assert info["verified_max_abs_diff"] < 1e-3
    processor = Sam3Processor.from_pretrained(out)
    inputs = make_inputs(processor, rows=1, seed=7)  # text only: one padding box
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(["pred_logits", "pred_masks"], {k: v.numpy() for k, v in inputs.items()})
    with torch.no_grad():
        ref = peft_model(**inputs)
    torch.testing.assert_close(torch.from_numpy(got[0]), ref.pred_logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.from_numpy(got[1]), ref.pred_masks, atol=1e-4, rtol=0)
