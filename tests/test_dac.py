"""One-to-many (DAC) queries: what the copy computes, that it exists in training only, and that it trains.

The reference for "a decoder pass whose queries skip self-attention" is built independently: the same decoder
with every self-attention output projection set to zero (weights and bias), so that the attention output is
exactly zero and the sublayer reduces to its layer norm, as the official ``dac_use_selfatt_ln`` path.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import test_module
import torch
from conftest import make_inputs
from hydra.utils import instantiate
from test_module import build_module, compose_cfg

from sam3lora.model import load_model
from sam3lora.model.dac import DacError, dac_outputs, install_dac_hooks

pytestmark = pytest.mark.usefixtures("one_thread")
batches = test_module.batches  # the shared training/validation batch fixture


def _capture_decoder_inputs(model: torch.nn.Module) -> dict:
    seen: dict = {}

    def keep_inputs(_module: torch.nn.Module, _args: tuple, kwargs: dict) -> None:
        seen.setdefault("kw", kwargs)

    def keep_embeds(_module: torch.nn.Module, _args: tuple, output: torch.Tensor) -> None:
        seen.setdefault("emb", output)

    model.detr_decoder.register_forward_pre_hook(keep_inputs, with_kwargs=True)
    model.mask_decoder.instance_projection.register_forward_hook(keep_embeds)
    return seen


def test_dac_pass_equals_decoder_without_self_attention() -> None:
    model, processor = load_model("tiny", dtype="float32", seed=0)
    model.eval()
    reference = copy.deepcopy(model)
    for layer in reference.detr_decoder.layers:
        torch.nn.init.zeros_(layer.self_attn.o_proj.weight)
        torch.nn.init.zeros_(layer.self_attn.o_proj.bias)
    install_dac_hooks(model)
    seen = _capture_decoder_inputs(model)
    inputs = make_inputs(processor, rows=3)
    with torch.no_grad():
        out = model(**inputs)
        dac = dac_outputs(model, seen["kw"], seen["emb"])
        ref = reference(**inputs)
    torch.testing.assert_close(dac["pred_logits"], ref.pred_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dac["pred_boxes"], ref.pred_boxes, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dac["pred_masks"].dense(), ref.pred_masks, rtol=1e-4, atol=1e-4)
    assert len(dac["aux_outputs"]) == len(model.detr_decoder.layers) - 1
    # the copy differs from the one-to-one queries (self-attention matters), which the extra pass leaves untouched
    assert not torch.allclose(dac["pred_logits"], out.pred_logits)
    with torch.no_grad():
        again = model(**inputs)
    assert torch.equal(again.pred_logits, out.pred_logits) and torch.equal(again.pred_masks, out.pred_masks)


def test_mask_formula_reproduces_the_mask_decoder() -> None:
    """The copy's masks use the mask decoder's own embedding; on the o2o queries it gives HF's pred_masks."""
    model, processor = load_model("tiny", dtype="float32", seed=0)
    model.eval()
    seen = _capture_decoder_inputs(model)
    hidden: dict = {}

    def keep_queries(_module: torch.nn.Module, _args: tuple, kwargs: dict) -> None:
        hidden["q"] = kwargs["decoder_queries"]

    model.mask_decoder.register_forward_pre_hook(keep_queries, with_kwargs=True)
    with torch.no_grad():
        out = model(**make_inputs(processor, rows=2))
        masks = torch.einsum("rqc,rchw->rqhw", model.mask_decoder.mask_embedder(hidden["q"]), seen["emb"])
    torch.testing.assert_close(masks, out.pred_masks)


def test_model_without_decoder_layers_is_refused() -> None:
    with pytest.raises(DacError, match="loss.o2m.enabled"):
        install_dac_hooks(torch.nn.Linear(2, 2))


def test_module_runs_dac_in_training_only(synthetic_root: Path, batches: dict) -> None:
    on = build_module(compose_cfg(synthetic_root))
    off = build_module(compose_cfg(synthetic_root, "loss.o2m.enabled=false"))
    assert on.use_dac and not off.use_dac
    batch = batches["train"]
    on.train()
    off.train()
    torch.manual_seed(0)
    out_on = on(batch)
    torch.manual_seed(0)
    out_off = off(batch)
    assert set(out_on["o2m"]) == {"pred_logits", "pred_boxes", "pred_masks", "aux_outputs"}
    assert out_on["o2m"]["pred_logits"].shape == out_on["pred_logits"].shape
    assert "o2m" not in out_off
    for key in ("pred_logits", "pred_boxes", "presence_logits"):  # the o2o half is unchanged
        assert torch.equal(out_on[key], out_off[key]), key
    assert torch.equal(out_on["pred_masks"].dense(), out_off["pred_masks"].dense())
    on.eval()
    assert "o2m" not in on(batch)


def test_training_step_with_dac_logs_o2m_terms_and_trains(synthetic_root: Path, batches: dict) -> None:
    module = build_module(compose_cfg(synthetic_root))
    module.train()
    batch = batches["train"]
    outputs = module(batch)
    losses = module.criterion(outputs, batch.targets)
    o2m_keys = {k for k in losses if k.endswith("_o2m")}
    assert {"loss_bbox_o2m", "loss_giou_o2m", "loss_ce_o2m", "loss_mask_o2m", "loss_dice_o2m"} <= o2m_keys
    assert any("_aux0_o2m" in k for k in o2m_keys) and not any("presence" in k for k in o2m_keys)
    losses["loss"].backward()
    grads = [p.grad for n, p in module.named_parameters() if p.requires_grad and "detr_decoder" in n]
    assert grads and all(g is not None for g in grads)


def test_o2m_terms_scale_with_weight(synthetic_root: Path, batches: dict) -> None:
    cfg = compose_cfg(synthetic_root)
    module = build_module(cfg)
    module.train()
    batch = batches["train"]
    torch.manual_seed(0)
    outputs = module(batch)
    double = instantiate(compose_cfg(synthetic_root, "loss.o2m.weight=4.0").loss)
    one = module.criterion(outputs, batch.targets)
    two = double(outputs, batch.targets)
    for key in (k for k in one if k.endswith("_o2m")):
        assert two[key].item() == pytest.approx(2 * one[key].item(), rel=1e-5), key


@pytest.mark.parametrize(
    "overrides",
    [["lora=minimal"], ["lora=full"], ["module.perf.activation_checkpointing=true"], ["bf16"]],
    ids=["minimal", "full", "checkpointing", "bf16"],
)
def test_dac_step_with_presets_checkpointing_and_bf16(synthetic_root: Path, batches: dict, overrides: list) -> None:
    bf16 = overrides == ["bf16"]
    module = build_module(compose_cfg(synthetic_root, *([] if bf16 else overrides)))
    module.train()
    batch = batches["train"]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        losses = module.criterion(module(batch), batch.targets)
    assert {"loss_ce_o2m", "loss_mask_o2m", "loss_bbox_aux0_o2m"} <= set(losses)
    assert torch.isfinite(losses["loss"])
    losses["loss"].backward()
    decoder = [p for n, p in module.named_parameters() if p.requires_grad and "detr_decoder" in n]
    assert decoder and all(p.grad is not None and torch.isfinite(p.grad).all() for p in decoder)

