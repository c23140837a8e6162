"""LoRA for SAM 3 through PEFT: one switch per component, compiled into an exact ``target_modules`` regex.

``LoraSettings`` is what ``conf/lora/*.yaml`` instantiate. ``apply_lora`` turns it into a ``peft.LoraConfig``,
wraps the model with ``peft.get_peft_model`` (every base parameter frozen; adapters and ``modules_to_save``
train) and checks that exactly the intended modules received adapters.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, fields

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

#: Projection names a preset may target. ``o_proj`` also covers the CLIP text encoder's ``out_proj``; ``fc1``
#: and ``fc2`` are the MLPs (in the mask decoder: the three-layer ``mask_embedder``).
from sam3lora.errors import Sam3LoRAError
from sam3lora.model.load_base import meta_model

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2")
VARIANTS = ("lora", "dora", "rslora")

# component -> (attention module regex, MLP module regex, holds numbered layers). ``{L}`` is the layer index.
_LAYOUT: dict[str, tuple[str, str, bool]] = {
    "vision_encoder": (
        r"vision_encoder\.backbone\.layers\.{L}\.attention",
        r"vision_encoder\.backbone\.layers\.{L}\.mlp",
        True,
    ),
    "text_encoder": (
        r"text_encoder\.text_model\.encoder\.layers\.{L}\.self_attn",
        r"text_encoder\.text_model\.encoder\.layers\.{L}\.mlp",
        True,
    ),
    "geometry_encoder": (
        r"geometry_encoder\.layers\.{L}\.(?:self_attn|cross_attn)",
        r"geometry_encoder\.layers\.{L}\.mlp",
        True,
    ),
    "detr_encoder": (
        r"detr_encoder\.layers\.{L}\.(?:self_attn|cross_attn)",
        r"detr_encoder\.layers\.{L}\.mlp",
        True,
    ),
    "detr_decoder": (
        r"detr_decoder\.layers\.{L}\.(?:self_attn|text_cross_attn|vision_cross_attn)",
        r"detr_decoder\.layers\.{L}\.mlp",
        True,
    ),
    "mask_decoder": (r"mask_decoder\.prompt_cross_attn", r"mask_decoder\.mask_embedder", False),
}
COMPONENTS = tuple(_LAYOUT)
# Where each component keeps its numbered layers (for resolving negative layer indices).
_LAYER_LISTS = {
    "vision_encoder": "vision_encoder.backbone.layers",
    "text_encoder": "text_encoder.text_model.encoder.layers",
    "geometry_encoder": "geometry_encoder.layers",
    "detr_encoder": "detr_encoder.layers",
    "detr_decoder": "detr_decoder.layers",
}


class LoraTargetError(Sam3LoRAError, ValueError):
    """A LoRA setting names something the model does not have."""


@dataclass
class ComponentLora:
    """LoRA switch of one SAM 3 component.

    Attributes:
        enabled: give this component adapters.
        rank / alpha: override ``LoraSettings.rank`` / ``alpha`` for this component.
        targets: override ``LoraSettings.targets`` (names from ``PROJECTIONS``).
        layers: only these layer indices (negative counts from the end, e.g. ``[-2, -1]`` = last two);
            None means every layer. Not allowed for ``mask_decoder`` (it has no numbered layers).
    """

    enabled: bool
    rank: int | None
    alpha: float | None
    targets: list[str] | None
    layers: list[int] | None


@dataclass
class LoraSettings:
    """Everything that decides which adapters SAM 3 gets (one preset = one instance).

    The values live in ``conf/lora/*.yaml`` (``_base.yaml`` + one file per preset), the one place they are stated:
    ``sam3lora.config.defaults("lora/balanced", rank=4)`` builds a preset with changes, ``defaults("lora/_base",
    detr_decoder={"enabled": True})`` one of your own.

    Attributes:
        rank: LoRA rank r of every adapted Linear unless a component overrides it.
        alpha: LoRA scaling numerator (scale = alpha / r, or alpha / sqrt(r) with ``rslora``).
        dropout: dropout on the adapter input.
        variant: ``lora`` (plain), ``dora`` (weight-decomposed) or ``rslora`` (rank-stabilised scaling).
        init: PEFT ``init_lora_weights``: ``true`` (B = 0, so LoRA starts as the identity), ``gaussian``,
            ``pissa``, ``olora``, ... (``false`` = random B, for tests only).
        targets: projections to adapt in every enabled component (see ``PROJECTIONS``).
        modules_to_save: module names trained in full and saved with the adapter (e.g. ``["dot_product_scoring"]``).
        vision_encoder ... mask_decoder: one ``ComponentLora`` per component.
    """

    rank: int
    alpha: float
    dropout: float
    variant: str
    init: bool | str
    targets: list[str]
    modules_to_save: list[str]
    vision_encoder: ComponentLora
    text_encoder: ComponentLora
    geometry_encoder: ComponentLora
    detr_encoder: ComponentLora
    detr_decoder: ComponentLora
    mask_decoder: ComponentLora

    def __post_init__(self) -> None:
        for name in COMPONENTS:
            value = getattr(self, name)
            if isinstance(value, Mapping):
                known = {f.name for f in fields(ComponentLora)}
                unknown = sorted(set(value) - known)
                if unknown:
                    raise LoraTargetError(f"lora.{name}: unknown key(s) {unknown}; known: {sorted(known)}")
                missing = sorted(known - set(value))
                if missing:
                    raise LoraTargetError(f"lora.{name}: missing key(s) {missing} (conf/lora/_base.yaml states them "
                                          "all; build settings with sam3lora.config.defaults)")
                setattr(self, name, ComponentLora(**dict(value)))
        self.targets = list(self.targets)
        self.modules_to_save = list(self.modules_to_save)
        if self.variant not in VARIANTS:
            raise LoraTargetError(f"lora.variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.rank <= 0:
            raise LoraTargetError(f"lora.rank must be positive, got {self.rank}")
        for where, targets in [("lora.targets", self.targets)] + [
            (f"lora.{n}.targets", c.targets) for n, c in self.components().items() if c.targets is not None
        ]:
            unknown = sorted(set(targets) - set(PROJECTIONS))
            if unknown:
                raise LoraTargetError(f"{where}: unknown projection name(s) {unknown}; known: {list(PROJECTIONS)}")
        if self.mask_decoder.layers is not None:
            raise LoraTargetError("lora.mask_decoder.layers: the mask decoder has no numbered layers")
        if not any(c.enabled for c in self.components().values()):
            raise LoraTargetError(f"lora: no component is enabled; enable at least one of {list(COMPONENTS)}")

    def components(self) -> dict[str, ComponentLora]:
        return {name: getattr(self, name) for name in COMPONENTS}


def unwrap_base(model: nn.Module) -> nn.Module:
    """The ``Sam3Model`` inside a ``PeftModel`` (the model itself when it has no adapters)."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def _layer_count(model: nn.Module, component: str) -> int:
    return len(model.get_submodule(_LAYER_LISTS[component]))


def component_pattern(model: nn.Module, component: str, settings: LoraSettings) -> str:
    """Regex (for ``re.fullmatch``) of the Linear modules that get adapters in ``component``."""
    comp = settings.components()[component]
    targets = comp.targets if comp.targets is not None else settings.targets
    attn_re, mlp_re, numbered = _LAYOUT[component]
    layer = r"\d+"
    if numbered and comp.layers is not None:
        count = _layer_count(model, component)
        indices = set()
        for i in comp.layers:
            if not -count <= i < count:
                raise LoraTargetError(f"lora.{component}.layers: index {i} out of range for {count} layers")
            indices.add(i % count)
        layer = "(?:" + "|".join(str(i) for i in sorted(indices)) + ")"
    parts = []
    attn = [t for t in targets if t.endswith("_proj")]
    if attn:
        names = [("(?:o_proj|out_proj)" if t == "o_proj" else t) for t in attn]
        parts.append(attn_re.replace("{L}", layer) + r"\.(?:" + "|".join(names) + ")")
    mlp = [t for t in targets if t in ("fc1", "fc2")]
    if mlp:
        if component == "mask_decoder":
            parts.append(mlp_re + r"\.layers\.\d+")
        else:
            parts.append(mlp_re.replace("{L}", layer) + r"\.(?:" + "|".join(mlp) + ")")
    if not parts:
        raise LoraTargetError(f"lora.{component}: no projection targeted")
    return "(?:" + "|".join(parts) + ")"


def plan(model: nn.Module, settings: LoraSettings) -> dict[str, list[str]]:
    """Component -> names of the Linear modules that will get adapters. Errors on a component matching nothing."""
    linear = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    result: dict[str, list[str]] = {}
    for component, comp in settings.components().items():
        if not comp.enabled:
            continue
        pattern = re.compile(component_pattern(model, component, settings))
        matched = [name for name in linear if pattern.fullmatch(name)]
        if not matched:
            raise LoraTargetError(
                f"lora.{component} is enabled but matches no Linear module of this model "
                f"(pattern {pattern.pattern}); check lora.{component}.targets / layers"
            )
        result[component] = matched
    return result


def lora_config(model: nn.Module, settings: LoraSettings) -> LoraConfig:
    """The ``peft.LoraConfig`` that implements ``settings`` on ``model``."""
    patterns = {c: component_pattern(model, c, settings) for c, s in settings.components().items() if s.enabled}
    plan(model, settings)  # raises on a component that matches nothing
    known = {name for name, _ in model.named_modules()}
    for name in settings.modules_to_save:
        if name not in known:
            raise LoraTargetError(f"lora.modules_to_save: the model has no module named {name!r}")
    rank_pattern = {p: settings.components()[c].rank for c, p in patterns.items() if settings.components()[c].rank}
    alpha_pattern = {
        p: settings.components()[c].alpha for c, p in patterns.items() if settings.components()[c].alpha
    }
    return LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules="|".join(patterns.values()),
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        use_dora=settings.variant == "dora",
        use_rslora=settings.variant == "rslora",
        init_lora_weights=settings.init,
        modules_to_save=settings.modules_to_save or None,
        bias="none",
    )


def apply_lora(model: nn.Module, settings: LoraSettings, adapter_name: str = "default") -> PeftModel:
    """Wrap ``model`` with adapter ``adapter_name`` (on a ``PeftModel``: add it beside the adapters it holds); only
    adapters and ``modules_to_save`` remain trainable.

    Raises ``LoraTargetError`` if PEFT adapted a different set of modules than ``plan`` intends.
    """
    # the plan matches plain Linear layers: a model that already holds adapters is planned on its architecture
    # rebuilt on the meta device (no memory)
    layout = meta_model(unwrap_base(model).config) if isinstance(model, PeftModel) else model
    intended = {name for names in plan(layout, settings).values() for name in names}
    config = lora_config(layout, settings)
    if isinstance(model, PeftModel):
        model.add_adapter(adapter_name, config)
        peft_model = model
    else:
        peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    adapted = set(adapted_modules(peft_model, adapter_name))
    if adapted != intended:
        raise LoraTargetError(
            f"PEFT adapted {len(adapted)} modules but {len(intended)} were intended; "
            f"unexpected: {sorted(adapted - intended)[:5]}, missing: {sorted(intended - adapted)[:5]}"
        )
    return peft_model


def adapted_modules(peft_model: PeftModel, adapter_name: str | None = None) -> list[str]:
    """Names (relative to the base model) of the modules that carry a LoRA adapter (``adapter_name``, or any)."""
    base = peft_model.get_base_model()
    return [
        name
        for name, module in base.named_modules()
        if hasattr(module, "lora_A") and (adapter_name in module.lora_A if adapter_name else len(module.lora_A))
    ]


def component_of(param_name: str) -> str:
    """Top-level component of a parameter name of the base model (PEFT prefixes stripped)."""
    name = param_name.removeprefix("base_model.model.")
    return name.split(".", 1)[0]


def parameter_report(model: nn.Module) -> list[dict[str, int | str]]:
    """Per top-level component: total and trainable parameter counts, plus a ``total`` row.

    Adapter weights count towards the component they adapt; ``modules_to_save`` copies count once.
    """
    rows: dict[str, dict[str, int | str]] = {}
    for name, param in model.named_parameters():
        if "original_module" in name:  # PEFT keeps the frozen original beside a modules_to_save copy
            continue
        comp = component_of(name)
        row = rows.setdefault(comp, {"component": comp, "total": 0, "trainable": 0})
        row["total"] += param.numel()  # type: ignore[operator]
        if param.requires_grad:
            row["trainable"] += param.numel()  # type: ignore[operator]
    out = list(rows.values())
    out.append(
        {
            "component": "total",
            "total": sum(int(r["total"]) for r in out),
            "trainable": sum(int(r["trainable"]) for r in out),
        }
    )
    return out


def trainable_parameters(model: nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]
