"""LoRA through PEFT: presets and component switches adapt exactly the intended modules; errors; training."""

from __future__ import annotations

import pytest
import torch
from conftest import make_inputs
from torch import nn

from sam3lora.config import defaults
from sam3lora.lora import (
    COMPONENTS,
    LoraSettings,
    LoraTargetError,
    adapted_modules,
    apply_lora,
    parameter_report,
)

ATTN = {"q_proj", "k_proj", "v_proj", "o_proj", "out_proj"}
MLP = {"fc1", "fc2"}


def preset(name: str) -> LoraSettings:
    return defaults(f"lora/{name}")


def linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def expected(model: nn.Module, rules: dict[str, set[str]]) -> set[str]:
    """Independent of the regex compiler: component prefix + leaf name, attention/MLP containers only."""
    out = set()
    for name in linear_names(model):
        comp, leaf = name.split(".", 1)[0], name.rsplit(".", 1)[-1]
        if comp not in rules:
            continue
        parent = name.rsplit(".", 2)[-2]
        if comp == "mask_decoder" and ".mask_embedder.layers." in name:
            if rules[comp] & MLP:
                out.add(name)
        elif leaf in rules[comp] and (parent in {"mlp"} or "attn" in parent or parent == "attention"):
            out.add(name)
    return out


@pytest.mark.parametrize(
    "name,rules",
    [
        ("minimal", {c: ATTN for c in ("detr_encoder", "detr_decoder", "mask_decoder")}),
        (
            "balanced",
            {
                "vision_encoder": {"q_proj", "v_proj"},
                "geometry_encoder": ATTN,
                **{c: ATTN | MLP for c in ("detr_encoder", "detr_decoder", "mask_decoder")},
            },
        ),
        (
            "full",
            {
                "text_encoder": ATTN,
                **{c: ATTN | MLP for c in COMPONENTS if c != "text_encoder"},
            },
        ),
    ],
)
def test_presets_adapt_exactly_the_intended_modules(tiny, name, rules):
    model, _ = tiny
    want = expected(model, rules)
    peft_model = apply_lora(model, preset(name))
    assert set(adapted_modules(peft_model)) == want
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


@pytest.mark.parametrize("component", COMPONENTS)
def test_each_component_switch_alone(tiny, component):
    model, _ = tiny
    want = expected(model, {component: ATTN | MLP})
    all_projections = ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"]
    peft_model = apply_lora(model, defaults("lora/_base", targets=all_projections, **{component: {"enabled": True}}))
    adapted = adapted_modules(peft_model)
    assert adapted and all(n.startswith(component + ".") for n in adapted)
    assert set(adapted) == want


def test_layers_and_per_component_rank(tiny):
    model, _ = tiny
    vision = {"enabled": True, "layers": [-1], "rank": 2, "targets": ["q_proj"]}
    settings = defaults("lora/_base", rank=8, vision_encoder=vision)
    peft_model = apply_lora(model, settings)
    assert adapted_modules(peft_model) == ["vision_encoder.backbone.layers.3.attention.q_proj"]
    layer = peft_model.get_base_model().vision_encoder.backbone.layers[3].attention.q_proj
    assert layer.lora_A["default"].weight.shape[0] == 2


def test_unknown_projection_is_an_error():
    with pytest.raises(LoraTargetError, match="unknown projection name.*qkv"):
        defaults("lora/_base", targets=["qkv"], detr_decoder={"enabled": True})


def test_unknown_component_key_is_an_error():
    with pytest.raises(LoraTargetError, match="lora.detr_decoder: unknown key.*rnak"):
        defaults("lora/_base", detr_decoder={"enabled": True, "rnak": 4})


def test_component_matching_nothing_is_an_error_naming_it(tiny):
    model, _ = tiny
    model.geometry_encoder.layers = nn.ModuleList()  # a model variant without geometry layers
    with pytest.raises(LoraTargetError, match="lora.geometry_encoder is enabled but matches no Linear"):
        apply_lora(model, defaults("lora/_base", geometry_encoder={"enabled": True}))


def test_out_of_range_layer_is_an_error(tiny):
    model, _ = tiny
    with pytest.raises(LoraTargetError, match="index 9 out of range"):
        apply_lora(model, defaults("lora/_base", vision_encoder={"enabled": True, "layers": [9]}))


def test_nothing_enabled_is_an_error():
    with pytest.raises(LoraTargetError, match="no component is enabled"):
        defaults("lora/_base")


def test_modules_to_save_train_in_full(tiny):
    model, _ = tiny
    with pytest.raises(LoraTargetError, match="no module named 'nope'"):
        apply_lora(model, defaults("lora/_base", detr_decoder={"enabled": True}, modules_to_save=["nope"]))
    settings = defaults("lora/_base", detr_decoder={"enabled": True}, modules_to_save=["dot_product_scoring"])
    peft_model = apply_lora(model, settings)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert any("dot_product_scoring.modules_to_save" in n for n in trainable)


def test_lora_at_init_leaves_outputs_unchanged(tiny):
    model, processor = tiny
    inputs = make_inputs(processor, boxes=True)
    with torch.no_grad():
        before = model(**inputs)
        peft_model = apply_lora(model, preset("full"))
        after = peft_model(**inputs)
    torch.testing.assert_close(after.pred_logits, before.pred_logits)
    torch.testing.assert_close(after.pred_masks, before.pred_masks)


@pytest.mark.parametrize("variant", ["lora", "dora", "rslora"])
def test_variants_train_one_step_and_only_adapters_get_gradients(tiny, variant):
    model, processor = tiny
    settings = defaults("lora/_base", variant=variant, rank=4, detr_decoder={"enabled": True},
                        mask_decoder={"enabled": True})
    peft_model = apply_lora(model, settings)
    peft_model.train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    inputs = make_inputs(processor, boxes=True)
    losses = []
    for _ in range(3):
        out = peft_model(**inputs)
        loss = out.pred_logits.sigmoid().mean() + out.pred_masks.sigmoid().mean()
        optimizer.zero_grad()
        loss.backward()
        for name, p in peft_model.named_parameters():
            if not p.requires_grad:
                assert p.grad is None, name
        assert all(p.grad is not None for p in params)
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_parameter_report_counts(tiny):
    model, _ = tiny
    total = sum(p.numel() for p in model.parameters())
    peft_model = apply_lora(model, preset("minimal"))
    rows = {r["component"]: r for r in parameter_report(peft_model)}
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert rows["total"]["trainable"] == trainable
    assert rows["total"]["total"] == total + trainable
    assert rows["vision_encoder"]["trainable"] == 0 and rows["detr_decoder"]["trainable"] > 0
