"""Adapters in PEFT format: plain PEFT restores them; our loader refuses adapters made for another base."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_inputs
from peft import PeftModel
from safetensors.torch import load_file, save_file

from sam3lora.adapter import SIDECAR, AdapterMismatchError, load_adapter, save_adapter
from sam3lora.config import defaults
from sam3lora.lora import apply_lora
from sam3lora.model import build_tiny, load_model


def trained_adapter(tmp_path, variant="lora", modules_to_save=()):
    """A tiny adapter with non-zero weights (random B), saved to ``tmp_path/adapter``; returns (dir, outputs)."""
    model, processor = load_model("tiny", dtype="float32", seed=0)
    settings = defaults(
        "lora/_base", variant=variant, init=False, rank=4, detr_decoder={"enabled": True},
        mask_decoder={"enabled": True}, modules_to_save=list(modules_to_save),
    )
    torch.manual_seed(0)
    peft_model = apply_lora(model, settings)
    inputs = make_inputs(processor, boxes=True)
    with torch.no_grad():
        reference = peft_model(**inputs)
    return save_adapter(peft_model, tmp_path / "adapter", settings), inputs, reference


def test_saved_adapter_is_plain_peft_and_restores_identical_outputs(tmp_path):
    path, inputs, reference = trained_adapter(tmp_path)
    assert (path / "adapter_config.json").is_file() and (path / "adapter_model.safetensors").is_file()
    base, _ = load_model("tiny", dtype="float32", seed=0)
    with torch.no_grad():
        untouched = base(**inputs)
    assert not torch.allclose(untouched.pred_logits, reference.pred_logits)  # the adapter does something
    restored = PeftModel.from_pretrained(base, str(path))  # plain PEFT, no sam3lora code
    with torch.no_grad():
        out = restored(**inputs)
    torch.testing.assert_close(out.pred_logits, reference.pred_logits)
    torch.testing.assert_close(out.pred_masks, reference.pred_masks)


@pytest.mark.parametrize("variant,modules_to_save", [("dora", ()), ("lora", ("dot_product_scoring",))])
def test_our_loader_verifies_every_tensor(tmp_path, variant, modules_to_save):
    path, inputs, reference = trained_adapter(tmp_path, variant, modules_to_save)
    base, _ = load_model("tiny", dtype="float32", seed=0)
    restored = load_adapter(base, path)
    with torch.no_grad():
        out = restored(**inputs)
    torch.testing.assert_close(out.pred_logits, reference.pred_logits)


def test_sidecar_records_the_base(tmp_path):
    path, _, _ = trained_adapter(tmp_path)
    sidecar = json.loads((path / SIDECAR).read_text())
    assert sidecar["base"]["architecture"] and sidecar["base"]["weights"]
    assert "tiny-seed0" in sidecar["base"]["name_or_path"]
    assert sidecar["lora"]["detr_decoder"]["enabled"] is True


def test_other_base_weights_are_refused(tmp_path):
    path, _, _ = trained_adapter(tmp_path)
    other, _ = build_tiny(seed=1)
    with pytest.raises(AdapterMismatchError, match="other base weights"):
        load_adapter(other, path)
    load_adapter(other, path, check_weights=False)  # explicit opt-out still loads


def test_other_architecture_is_refused(tmp_path):
    path, _, _ = trained_adapter(tmp_path)
    model, _ = build_tiny(seed=0)
    model.config.detr_decoder_config.num_queries = 7  # another architecture
    with pytest.raises(AdapterMismatchError, match="architecture"):
        load_adapter(model, path)


def test_shape_mismatch_without_sidecar_is_named(tmp_path):
    path, _, _ = trained_adapter(tmp_path)
    (path / SIDECAR).unlink()
    tensors = load_file(path / "adapter_model.safetensors")
    key = next(k for k in tensors if ".lora_A." in k)
    tensors[key] = torch.zeros(4, 5)
    save_file(tensors, path / "adapter_model.safetensors")
    base, _ = load_model("tiny", dtype="float32", seed=0)
    with pytest.raises(AdapterMismatchError, match="does not fit"):
        load_adapter(base, path)


def test_missing_files_are_named(tmp_path):
    base, _ = load_model("tiny", dtype="float32", seed=0)
    with pytest.raises(AdapterMismatchError, match="missing adapter_config.json"):
        load_adapter(base, tmp_path)


def test_save_refuses_non_empty_dir_unless_overwrite(tmp_path):
    model, _ = load_model("tiny", dtype="float32", seed=0)
    peft_model = apply_lora(model, defaults("lora/_base", detr_decoder={"enabled": True}))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        save_adapter(peft_model, tmp_path / "out", overwrite=False)
    assert (tmp_path / "out" / "keep.txt").read_text() == "x"
