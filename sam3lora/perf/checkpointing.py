"""Activation checkpointing for SAM 3, per component.

``Sam3Model.gradient_checkpointing_enable()`` raises, but every transformer block of the ViT (``Sam3ViTLayer``)
and of the CLIP text encoder (``CLIPEncoderLayer``) is a transformers ``GradientCheckpointingLayer``: it runs
its forward through ``self._gradient_checkpointing_func`` when ``self.gradient_checkpointing`` is set and the
layer is training with gradients enabled. We set both on the layers of the chosen components.

The other components are plain modules: the layers of the geometry encoder, the DETR encoder and the DETR
decoder, and the mask decoder as one block (pixel decoder, prompt cross-attention, mask and semantic heads). On
those we install the same mechanism as an instance ``forward`` (:func:`_checkpointing_forward`) that reads the
same two attributes, and remove it again when switched off, so an un-checkpointed model is left as it was. As in
transformers, ``forward`` is checkpointed rather than ``__call__``: a block's own hooks run once, the hooks of
its sub-modules run again when backward recomputes it.

Non-reentrant checkpointing is used: it handles frozen layers whose only trainable weights are LoRA adapters
(their inputs do not require grad, which the reentrant variant cannot handle) and keyword arguments, which the
recomputation replays: the DAC pass's ``sam3lora_dac=True`` (``sam3lora.model.dac``) reaches each decoder
layer's self-attention in the recomputation as it did in the forward.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.modeling_layers import GradientCheckpointingLayer

#: Components that can checkpoint, in the order they run.
CHECKPOINTABLE = ("vision_encoder", "text_encoder", "geometry_encoder", "detr_encoder", "detr_decoder", "mask_decoder")
#: What ``module.perf.activation_checkpointing: true`` checkpoints (the encoders' ``GradientCheckpointingLayer``s).
ENCODERS = ("vision_encoder", "text_encoder")
#: Plain-module components -> the module whose children are the blocks (a trailing ``:self`` = the module itself).
_PLAIN_BLOCKS = {
    "geometry_encoder": "geometry_encoder.layers",
    "detr_encoder": "detr_encoder.layers",
    "detr_decoder": "detr_decoder.layers",
    "mask_decoder": "mask_decoder:self",
}
_INSTALLED = "_sam3lora_checkpointing"

CheckpointFn = Callable[..., Any]


def default_checkpoint_fn() -> CheckpointFn:
    """``torch.utils.checkpoint.checkpoint`` with ``use_reentrant=False``."""
    return functools.partial(checkpoint, use_reentrant=False)


def _base(model: nn.Module) -> nn.Module:
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _checkpointing_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """Instance ``forward`` of a plain block: checkpointed while ``gradient_checkpointing`` is on and training."""
    forward = type(self).forward
    if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
        return self._gradient_checkpointing_func(functools.partial(forward, self, **kwargs), *args)
    return forward(self, *args, **kwargs)


def _install(block: nn.Module) -> None:
    if not block.__dict__.get(_INSTALLED):
        block.forward = types.MethodType(_checkpointing_forward, block)
        block.gradient_checkpointing = False
        setattr(block, _INSTALLED, True)


def _uninstall(block: nn.Module) -> None:
    for name in ("forward", "gradient_checkpointing", "_gradient_checkpointing_func", _INSTALLED):
        block.__dict__.pop(name, None)


def checkpoint_layers(
    model: nn.Module, components: Sequence[str] = CHECKPOINTABLE
) -> dict[str, nn.Module]:
    """Name -> block of every checkpointable block under ``components`` of a (PEFT-wrapped) Sam3Model.

    ``GradientCheckpointingLayer``s for the encoders, the numbered layers of the geometry encoder and the DETR
    encoder/decoder, and the mask decoder itself.
    """
    unknown = sorted(set(components) - set(CHECKPOINTABLE))
    if unknown:
        raise ValueError(f"activation checkpointing: unknown component(s) {unknown}; known: {list(CHECKPOINTABLE)}")
    base = _base(model)
    layers: dict[str, nn.Module] = {}
    for component in components:
        where = _PLAIN_BLOCKS.get(component)
        if where is None:
            for name, module in base.get_submodule(component).named_modules():
                if isinstance(module, GradientCheckpointingLayer):
                    layers[f"{component}.{name}"] = module
        elif where.endswith(":self"):
            path = where.removesuffix(":self")
            if hasattr(base, path.split(".")[0]):
                layers[path] = base.get_submodule(path)
        elif hasattr(base, where.split(".")[0]):
            for name, module in base.get_submodule(where).named_children():
                layers[f"{where}.{name}"] = module
    return layers


def set_activation_checkpointing(
    model: nn.Module,
    components: Sequence[str] = ENCODERS,
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
        raise ValueError(f"activation checkpointing: no checkpointable block under {list(components)}")
    fn = checkpoint_fn or default_checkpoint_fn()
    for layer in layers.values():
        plain = not isinstance(layer, GradientCheckpointingLayer)
        if not enabled:
            if plain:
                _uninstall(layer)
            else:
                layer.gradient_checkpointing = False
                layer.__dict__.pop("_gradient_checkpointing_func", None)
            continue
        if plain:
            _install(layer)
        layer.gradient_checkpointing = True
        layer._gradient_checkpointing_func = fn
    return len(layers)


def checkpointed_components(model: nn.Module) -> list[str]:
    """Components of ``CHECKPOINTABLE`` whose blocks currently checkpoint (all of them)."""
    result = []
    for component in CHECKPOINTABLE:
        layers = checkpoint_layers(model, [component]).values()
        if layers and all(getattr(layer, "gradient_checkpointing", False) for layer in layers):
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
