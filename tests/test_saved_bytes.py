"""Bytes saved for backward (``sam3lora.perf.saved_bytes``): the counter's rules, and regression guards on the tiny
model (what each component keeps, what checkpointing leaves, frozen layers that keep nothing).

The guarded numbers were measured on the tiny preset with 2 images x 4 prompts (``batch_for``, seed 0) and are
exact byte counts of tensor shapes, so they do not depend on the machine; the bounds leave 5% for harmless changes.
``python scripts/benchmark.py memory --model tiny --presets minimal,balanced --activation-checkpointing off,all``
prints the same table.
"""

from __future__ import annotations

import pytest
import torch
from test_perf import batch_for, build_module
from torch import nn

from sam3lora.config import defaults
from sam3lora.perf.checkpointing import CHECKPOINTABLE
from sam3lora.perf.saved_bytes import LOSS, SavedBytes, SavedBytesReport
from sam3lora.training.module import Sam3LoRAModule

MB = 1e6


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread for this module


def measure(module: Sam3LoRAModule, autocast: bool = False, **kwargs: object) -> SavedBytesReport:
    """Saved bytes of one training forward + loss (2 images x 4 prompts), then the backward (it must still run);
    ``autocast``: under CPU bfloat16 autocast, as ``trainer.precision=bf16-mixed`` runs it."""
    batch = batch_for(module, images=2, prompts=4)
    module.train()
    counter = SavedBytes(module.model, **kwargs)
    mixed = torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast)
    try:
        torch.manual_seed(0)
        with counter.recording(), mixed:
            outputs = module(batch)
            with counter.label(LOSS):
                loss = module.criterion(outputs, batch.targets)["loss"]
        report = counter.report(images=batch.num_images, rows=batch.num_rows)
    finally:
        counter.remove()
    loss.backward()
    module.zero_grad(set_to_none=True)
    return report


# ----------------------------------------------------------------------------------------------- the counter


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.frozen = nn.Linear(8, 8)
        self.adapted = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)


def test_counter_attributes_each_storage_once_and_skips_parameters_and_dropped_graphs() -> None:
    toy = Toy()
    counter = SavedBytes(toy, groups={"frozen": ["frozen"], "adapted": ["adapted"]})
    x = torch.randn(4, 8)
    with counter.recording():
        h = toy.frozen(x)  # nothing requires grad: nothing saved
        y = toy.adapted(h)  # saves h (4 x 8 float32) for the weight's gradient
        y2 = toy.adapted(h[:2])  # a view of h: the same storage, counted once
        z = torch.tanh(y)  # saves its output (4 x 8), outside every group
        dropped = torch.exp(y)  # saves its output, but the graph is dropped below
        with counter.label(LOSS):
            loss = (z.sum() + y2.sum()) * 2.0  # saves nothing (a constant factor)
    del dropped
    report = counter.report()
    assert report.by_component == {"adapted": 4 * 8 * 4, "other": 4 * 8 * 4}
    assert report.tensors == 2
    loss.backward()
    x.requires_grad_(True)  # now the weight is saved for the input's gradient: a parameter, not counted
    with counter.recording():
        out = toy.adapted(x).sum()
    assert counter.report().by_component == {"adapted": 4 * 8 * 4}
    out.backward()
    assert counter.report().by_component == {}  # backward freed the graph
    counter.remove()
    with counter.recording():
        out = toy.adapted(x).sum()
    assert counter.report().by_component == {"other": 4 * 8 * 4}  # hooks removed: nothing is attributed


# ----------------------------------------------------------------------------------------------- the tiny model


def test_frozen_layers_below_the_first_adapted_one_save_nothing() -> None:
    module = build_module("lora=balanced", "++lora.vision_encoder.layers=[2,3]")
    groups = {"vision_encoder": ["vision_encoder"], "neck": ["vision_encoder.neck"],
              **{f"layer{i}": [f"vision_encoder.backbone.layers.{i}"] for i in range(4)}}
    saved = measure(module, groups=groups).by_component
    # measured: layer2 2.06 MB, layer3 2.29 MB, neck 4.92 MB (frozen, but the gradient flows through it)
    assert "vision_encoder" not in saved and "layer0" not in saved and "layer1" not in saved, saved
    assert 1.5 * MB < saved["layer2"] <= 1.05 * 2.06 * MB and 1.5 * MB < saved["layer3"] <= 1.05 * 2.30 * MB
    assert saved["neck"] <= 1.05 * 4.92 * MB
    frozen = measure(build_module("lora=minimal"))  # no adapter in either encoder: they keep nothing
    assert "vision_encoder" not in frozen.by_component and "text_encoder" not in frozen.by_component


#: balanced, 2 images x 4 prompts, MB per image: (checkpointing off, everything checkpointed)
BALANCED_MB = {
    "vision_encoder": (6.91, 2.85),
    "geometry_encoder": (1.28, 0.59),
    "detr_encoder": (11.09, 0.86),
    "detr_decoder": (12.14, 1.41),  # the box-RPB masks are rebuilt, not kept
    "mask_decoder": (17.13, 5.42),
    "other": (0.07, 0.07),
    "loss": (11.46, 11.46),  # the mask products (MaskProduct, formed in the loss) keep the instance embeddings
}


def test_saved_bytes_per_component_and_what_checkpointing_leaves() -> None:
    module = build_module("lora=balanced")
    off = measure(module)
    module.configure_perf(defaults("module/default.perf", activation_checkpointing=list(CHECKPOINTABLE)))
    on = measure(module)
    off_mb = {k: v / MB for k, v in off.per_image().items()}
    on_mb = {k: v / MB for k, v in on.per_image().items()}
    assert set(off_mb) == set(BALANCED_MB) | {"total"}, off_mb
    for component, (plain, ckpt) in BALANCED_MB.items():
        assert off_mb[component] <= 1.05 * plain, (component, off_mb[component])
        assert on_mb[component] <= 1.05 * ckpt, (component, on_mb[component])
    assert on_mb["total"] <= 0.5 * off_mb["total"]  # measured 22.7 of 60.1 MB per image
    # a checkpointed layer stack keeps (almost) only the inputs of its layers
    inputs = {k: v / on.images / MB for k, v in on.checkpoint_inputs.items()}
    for component in ("detr_encoder", "mask_decoder"):
        assert on_mb[component] - inputs[component] <= 0.05 * off_mb[component], component
    # the DETR decoder also keeps its per-layer box refinement and presence heads (outside the layers)
    assert on_mb["detr_decoder"] - inputs["detr_decoder"] <= 0.1 * off_mb["detr_decoder"]


# ------------------------------------------------------------------------------------- no duplicated activations


class QKV(nn.Module):
    """A frozen norm feeding three projections (the q/k/v of an attention block) and a frozen output layer."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(32)
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 32)
        self.out = nn.Linear(32, 32)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = self.norm(h)  # float32 under autocast (layer norm runs in float32)
        return self.out(self.q_proj(x) * self.k_proj(x) + self.v_proj(x))


def toy_peft() -> nn.Module:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"], init_lora_weights=False)
    return get_peft_model(QKV(), config)


def toy_saved(model: nn.Module, h: torch.Tensor) -> tuple[SavedBytesReport, torch.Tensor]:
    counter = SavedBytes(model, groups={"all": [""]}, find_copies=True)
    with counter.recording(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(h)
    report = counter.report()
    counter.remove()
    out.float().sum().backward()
    return report, out.detach()


def test_each_lora_input_is_cast_once_under_autocast() -> None:
    from sam3lora.perf.precision import single_input_cast

    model, h = toy_peft(), torch.randn(64, 32)
    cast_bytes = h.numel() * 2  # one bfloat16 copy of the norm's output
    assert single_input_cast(model, enabled=False) == 3
    plain, plain_out = toy_saved(model, h)
    plain_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    single_input_cast(model)
    once, once_out = toy_saved(model, h)
    # PEFT + autocast: each adapter casts the input for itself, three saved copies; one with the shared cast
    assert plain.copies["duplicates"] == 2 * cast_bytes, plain.copies
    assert once.copies["duplicates"] == 0, once.copies
    assert plain.total - once.total == 2 * cast_bytes
    torch.testing.assert_close(once_out, plain_out, rtol=0, atol=0)  # the same casts, made once
    for name, grad in plain_grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=0, atol=0, msg=name)


def test_a_compute_dtype_base_saves_no_weight_copies() -> None:
    from sam3lora.perf.precision import cast_frozen_base, prepare_low_precision_base

    # the gradient reaches every frozen weight; a bfloat16 input as in the model (a CPU layer norm takes one dtype)
    model, h = toy_peft(), torch.randn(64, 32, dtype=torch.bfloat16, requires_grad=True)
    fp32, _ = toy_saved(model, h)
    # autocast casts each frozen float32 weight on the gradient path every step and saves the copy
    weights = sum(m.base_layer.weight.numel() * 2 for m in (model.q_proj, model.k_proj, model.v_proj))
    assert fp32.copies["weight_casts"] >= weights + model.out.weight.numel() * 2, fp32.copies
    assert cast_frozen_base(model, "bfloat16") > 0
    assert prepare_low_precision_base(model) == torch.bfloat16
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)  # the adapters stay float32
    bf16, _ = toy_saved(model, h)
    assert bf16.copies["weight_casts"] == 0, bf16.copies
    assert fp32.total - bf16.total >= fp32.copies["weight_casts"]


def test_tiny_model_under_autocast_saves_no_weight_casts_with_a_bf16_base() -> None:
    float_base = measure(build_module("lora=balanced"), autocast=True, find_copies=True)
    module = build_module("lora=balanced", "module.perf.base_dtype=bfloat16")
    frozen = {p.dtype for p in module.model.parameters() if not p.requires_grad}
    assert frozen == {torch.bfloat16, torch.float32}  # float32: only the geometry encoder's feature norm (CPU)
    assert {p.dtype for p in module.model.parameters() if p.requires_grad} == {torch.float32}
    bf16_base = measure(module, find_copies=True)  # the module autocasts to its base dtype on its own
    # measured: 3.05 MB of weight casts with the float32 base, none with the bfloat16 one; total 36.6 -> 34.2 MB
    assert float_base.copies["weight_casts"] > 2 * MB, float_base.copies
    assert bf16_base.copies["weight_casts"] == 0, bf16_base.copies
    assert bf16_base.total <= float_base.total - float_base.copies["weight_casts"] / 2
    # what is left is computed twice by transformers and the DAC pass, not cast twice (docs/performance.md):
    # each DETR decoder layer adds the same vision position encoding, the DAC pass repeats the decoder's K/V
    assert bf16_base.copies["duplicates"] <= 1.05 * 7.05 * MB, bf16_base.copies
