"""Model loading: the tiny preset through from_pretrained, determinism, forward paths, clear load errors."""

from __future__ import annotations

import pytest
import torch
from conftest import make_inputs
from transformers import Sam3Config, Sam3Model, Sam3Processor

from sam3lora.lora import COMPONENTS
from sam3lora.model import ModelLoadError, build_tiny, load_model, materialise_tiny, meta_model


def test_tiny_loads_through_from_pretrained(tiny):
    model, processor = tiny
    assert isinstance(model, Sam3Model) and isinstance(processor, Sam3Processor)
    for component in COMPONENTS:  # same module names as facebook/sam3, all six components
        assert hasattr(model, component)
    assert model.config.image_size == processor.image_processor.size["height"] == 224
    # plain transformers opens the materialised directory, no sam3lora code involved
    again = Sam3Model.from_pretrained(materialise_tiny(0))
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_tiny_is_deterministic_per_seed(tmp_path):
    a = Sam3Model.from_pretrained(materialise_tiny(0, root=tmp_path / "a"))
    b = Sam3Model.from_pretrained(materialise_tiny(0, root=tmp_path / "b"))
    c, _ = build_tiny(seed=1)
    wa = a.vision_encoder.backbone.layers[0].attention.q_proj.weight
    assert torch.equal(wa, b.vision_encoder.backbone.layers[0].attention.q_proj.weight)
    assert not torch.equal(wa, c.vision_encoder.backbone.layers[0].attention.q_proj.weight)


@pytest.mark.parametrize("mode", ["text", "boxes", "text+boxes"])
def test_forward_text_boxes_both(tiny, mode):
    model, processor = tiny
    inputs = make_inputs(processor, rows=2, boxes="boxes" in mode, text="text" in mode)
    with torch.no_grad():
        out = model(**inputs)
    q = model.config.detr_decoder_config.num_queries
    assert out.pred_logits.shape == (2, q)
    assert out.pred_boxes.shape == (2, q, 4)
    assert out.presence_logits.shape == (2, 1)
    assert out.pred_masks.shape == (2, q, 64, 64)  # 224 / 14 * 4
    assert torch.isfinite(out.pred_masks).all()
    assert ((out.pred_boxes >= 0) & (out.pred_boxes <= 1)).all()


def test_box_prompts_change_the_output(tiny):
    model, processor = tiny
    with torch.no_grad():
        text_only = model(**make_inputs(processor, boxes=False))
        with_boxes = model(**make_inputs(processor, boxes=True))
    assert not torch.allclose(text_only.pred_logits, with_boxes.pred_logits)


def test_image_size_mismatch_is_an_error():
    with pytest.raises(ValueError, match="image_size=1008"):
        load_model("tiny", image_size=1008, dtype="float32", seed=0)


def test_gated_or_offline_hub_gives_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="HF_TOKEN"):
        load_model("facebook/sam3", dtype="float32", seed=0)


def test_missing_local_directory_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="local directory"):
        load_model(str(tmp_path / "empty"), dtype="float32", seed=0)


def test_bad_dtype_is_an_error():
    with pytest.raises(ValueError, match="model.dtype"):
        load_model("tiny", dtype="float64", seed=0)


def test_full_size_architecture_on_meta_device():
    model = meta_model()
    assert sum(p.numel() for p in model.parameters()) == 840_376_374
    assert next(model.parameters()).device.type == "meta"
    assert model.config.image_size == Sam3Config().image_size == 1008
