"""Activation checkpointing for SAM 3's vision and text encoders.

``Sam3Model.gradient_checkpointing_enable()`` raises, but every transformer block of the ViT (``Sam3ViTLayer``)
and of the CLIP text encoder (``CLIPEncoderLayer``) is a transformers ``GradientCheckpointingLayer``: it runs
its forward through ``self._gradient_checkpointing_func`` when ``self.gradient_checkpointing`` is set and the
layer is training with gradients enabled. We set both on the layers of the chosen components. Non-reentrant
checkpointing is used: it handles frozen layers whose only trainable weights are LoRA adapters (their inputs do
not require grad, which the reentrant variant cannot handle) and keyword arguments.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.modeling_layers import GradientCheckpointingLayer

#: Components whose blocks are ``GradientCheckpointingLayer``s (the DETR parts and heads are plain modules).
CHECKPOINTABLE = ("vision_encoder", "text_encoder")

CheckpointFn = Callable[..., Any]


def default_checkpoint_fn() -> CheckpointFn:
    """``torch.utils.checkpoint.checkpoint`` with ``use_reentrant=False``."""
    return functools.partial(checkpoint, use_reentrant=False)


def _base(model: nn.Module) -> nn.Module:
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def checkpoint_layers(
    model: nn.Module, components: Sequence[str] = CHECKPOINTABLE
) -> dict[str, GradientCheckpointingLayer]:
    """Name -> layer of every ``GradientCheckpointingLayer`` under ``components`` of a (PEFT-wrapped) Sam3Model."""
    unknown = sorted(set(components) - set(CHECKPOINTABLE))
    if unknown:
        raise ValueError(f"activation checkpointing: unknown component(s) {unknown}; known: {list(CHECKPOINTABLE)}")
    base = _base(model)
    layers = {}
    for component in components:
        for name, module in base.get_submodule(component).named_modules():
            if isinstance(module, GradientCheckpointingLayer):
                layers[f"{component}.{name}"] = module
    return layers


def set_activation_checkpointing(
    model: nn.Module,
    components: Sequence[str] = CHECKPOINTABLE,
    enabled: bool = True,
    checkpoint_fn: CheckpointFn | None = None,
) -> int:
    """Switch activation checkpointing on (or off) for the blocks of ``components``; returns how many blocks.

    Args:
        model: ``Sam3Model`` or a PEFT model around one.
        components: subset of ``CHECKPOINTABLE``.
        enabled: on or off. Switching on for some components does not switch the others off.
        checkpoint_fn: ``fn(function, *args) -> output`` (default: non-reentrant ``torch.utils.checkpoint``).
    """
    layers = checkpoint_layers(model, components)
    if enabled and not layers:
        raise ValueError(f"activation checkpointing: no GradientCheckpointingLayer under {list(components)}")
    fn = checkpoint_fn or default_checkpoint_fn()
    for layer in layers.values():
        layer.gradient_checkpointing = enabled
        if enabled:
            layer._gradient_checkpointing_func = fn
        elif "_gradient_checkpointing_func" in layer.__dict__:
            del layer._gradient_checkpointing_func
    return len(layers)


def checkpointed_components(model: nn.Module) -> list[str]:
    """Components of ``CHECKPOINTABLE`` whose blocks currently checkpoint (all of them)."""
    result = []
    for component in CHECKPOINTABLE:
        layers = checkpoint_layers(model, [component]).values()
        if layers and all(layer.gradient_checkpointing for layer in layers):
            result.append(component)
    return result


class RecomputeFlops:
    """A checkpoint function that also measures the FLOPs spent recomputing checkpointed blocks in backward.

    Used by the benchmark so that model FLOP utilisation counts the model's FLOPs once: set ``counter`` to the
    active ``torch.utils.flop_counter.FlopCounterMode`` and subtract ``flops`` from its total.
    """

    def __init__(self) -> None:
        self.counter: Any = None
        self.flops = 0

    def __call__(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        def run(*inner: Any) -> Any:
            counter = self.counter
            if counter is None or torch._C._current_graph_task_id() == -1:  # the forward pass, not a recompute
                return function(*inner)
            before = counter.get_total_flops()
            try:  # early-stopped recomputation leaves through an exception: count what ran anyway
                return function(*inner)
            finally:
                self.flops += counter.get_total_flops() - before

        return checkpoint(run, *args, use_reentrant=False, **kwargs)
