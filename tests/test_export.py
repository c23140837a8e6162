"""Merge + export: a plain transformers directory that loads without sam3lora and matches the adapter."""

from __future__ import annotations

import pytest
import torch
from conftest import make_inputs
from transformers import Sam3Model, Sam3Processor

from sam3lora.config import defaults
from sam3lora.export import export_merged
from sam3lora.lora import apply_lora
from sam3lora.model import load_model


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_merge_export_round_trip_through_plain_transformers(tmp_path, variant):
    model, processor = load_model("tiny", dtype="float32", seed=0)
    torch.manual_seed(0)
    settings = defaults(
        "lora/_base", variant=variant, init=False, rank=4, vision_encoder={"enabled": True},
        detr_decoder={"enabled": True}, mask_decoder={"enabled": True},
    )
    peft_model = apply_lora(model, settings).eval()
    inputs = make_inputs(processor, boxes=True)
    with torch.no_grad():
        unmerged = peft_model(**inputs)
    out = export_merged(peft_model, processor, tmp_path / "merged")
    merged = Sam3Model.from_pretrained(out).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    Sam3Processor.from_pretrained(out)
    with torch.no_grad():
        again = merged(**inputs)
    torch.testing.assert_close(again.pred_logits, unmerged.pred_logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(again.pred_masks, unmerged.pred_masks, atol=1e-4, rtol=0)
    torch.testing.assert_close(again.pred_boxes, unmerged.pred_boxes, atol=1e-4, rtol=0)


def test_export_bf16_and_refuses_overwrite(tmp_path):
    model, processor = load_model("tiny", dtype="float32", seed=0)
    peft_model = apply_lora(model, defaults("lora/_base", detr_decoder={"enabled": True}))
    out = export_merged(peft_model, processor, tmp_path / "m", dtype="bfloat16")
    loaded = Sam3Model.from_pretrained(out, dtype="auto")
    assert next(loaded.parameters()).dtype == torch.bfloat16
    model2, processor2 = load_model("tiny", dtype="float32", seed=0)
    with pytest.raises(FileExistsError):
        export_merged(apply_lora(model2, defaults("lora/_base", detr_decoder={"enabled": True})), processor2, out)


@pytest.mark.parametrize("label", [-10, 1])  # text only (padding box) and an exemplar box
def test_onnx_row_forward_runs_the_contract_like_sam3model_on_one_row(label):
    from sam3lora.inference.onnx_export import _RowForward, sample_inputs

    model, processor = load_model("tiny", dtype="float32", seed=0)
    inputs = sample_inputs(processor, label=label)
    with torch.no_grad():
        got = _RowForward(model.eval())(**inputs)
        ref = model(**inputs)
    for g, r in zip(got, (ref.pred_logits, ref.pred_boxes, ref.presence_logits, ref.pred_masks), strict=True):
        assert g.shape == r.shape and torch.allclose(g, r, atol=1e-5)
