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
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers.modeling_layers import GradientCheckpointingLayer

from sam3lora.lora import unwrap_base

#: Components that can checkpoint, in the order they run.
CHECKPOINTABLE = ("vision_encoder", "text_encoder", "geometry_encoder", "detr_encoder", "detr_decoder", "mask_decoder")
#: What ``module.perf.activation_checkpointing: true`` checkpoints (the encoders' ``GradientCheckpointingLayer``s).
ENCODERS = ("vision_encoder", "text_encoder")
#: ``module.perf.activation_checkpointing: auto``: planned on the first batch (``sam3lora.perf.memory_plan``)
AUTO = "auto"
#: Plain-module components -> the module whose children are the blocks (a trailing ``:self`` = the module itself).
_PLAIN_BLOCKS = {
    "geometry_encoder": "geometry_encoder.layers",
    "detr_encoder": "detr_encoder.layers",
    "detr_decoder": "detr_decoder.layers",
    "mask_decoder": "mask_decoder:self",
}
_INSTALLED = "_sam3lora_checkpointing"
_DECODER = "_sam3lora_rpb_decoder"  # on a DETR decoder layer: (its decoder,), a tuple so deepcopy maps it too
_RPB_ARGS = "_sam3lora_rpb_args"  # on the decoder: the arguments of its latest box-RPB computation
_RPB_CHECKED = "_sam3lora_rpb_checked"
MASK_KWARG = "vision_cross_attn_mask"

CheckpointFn = Callable[..., Any]


def default_checkpoint_fn() -> CheckpointFn:
    """``torch.utils.checkpoint.checkpoint`` with ``use_reentrant=False``."""
    return functools.partial(checkpoint, use_reentrant=False)


def _checkpointing_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """Instance ``forward`` of a plain block: checkpointed while ``gradient_checkpointing`` is on and training."""
    forward = type(self).forward
    if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
        rebuild = _mask_rebuilder(self, kwargs, pop=True)
        if rebuild is not None:
            return _checkpoint_rebuilding_mask(self, forward, rebuild, args, kwargs)
        return self._gradient_checkpointing_func(functools.partial(forward, self, **kwargs), *args)
    return forward(self, *args, **kwargs)


# A DETR decoder layer's inputs are dominated by its box relative-position bias (``vision_cross_attn_mask``,
# (R, heads, Q+1, HW) float: 15 MB per layer and pass at 336 px with 4 prompts, 9x that at 1008 px), which the
# decoder computes from the layer's reference boxes (R, Q, 4) with frozen weights. Keeping it for the
# recomputation would cost as much as most of the layer; instead the checkpoint keeps the boxes and rebuilds the
# mask in the recomputation. The first rebuild of each decoder is compared with the mask it replaces.


def _recording_rpb(self: nn.Module, reference_boxes: Tensor, spatial_shape: Any) -> Tensor:
    """Instance ``_get_rpb_matrix`` of a checkpointing decoder: remember its arguments for the next layer."""
    self.__dict__[_RPB_ARGS] = (reference_boxes, spatial_shape)
    return type(self)._get_rpb_matrix(self, reference_boxes, spatial_shape)


def _mask_rebuilder(layer: nn.Module, kwargs: dict[str, Any], pop: bool = False) -> Callable[[], Tensor] | None:
    """For a checkpointing DETR decoder layer: a function that rebuilds its ``vision_cross_attn_mask`` from the
    reference boxes, when the mask was just computed from them and needs no gradient (else None)."""
    ref = layer.__dict__.get(_DECODER)
    decoder = ref[0] if ref is not None else None
    mask = kwargs.get(MASK_KWARG)
    if decoder is None or not isinstance(mask, Tensor) or mask.requires_grad:
        return None
    rpb_args = decoder.__dict__.pop(_RPB_ARGS, None) if pop else decoder.__dict__.get(_RPB_ARGS)
    if rpb_args is None:
        return None
    boxes, shape = rpb_args

    def rebuild() -> Tensor:
        rpb = type(decoder)._get_rpb_matrix(decoder, boxes, shape)  # (R, heads, Q, HW)
        return F.pad(rpb, (0, 0, 1, 0), mode="constant", value=0)  # + the presence token's row, as the decoder

    if pop and not decoder.__dict__.get(_RPB_CHECKED):
        with torch.no_grad():
            same = torch.equal(rebuild(), mask)
        if not same:
            raise RuntimeError(
                "activation checkpointing of detr_decoder: the box relative-position bias rebuilt from the reference "
                "boxes differs from the decoder's (changed transformers version?); checkpoint without detr_decoder"
            )
        decoder.__dict__[_RPB_CHECKED] = True
    return rebuild


def _checkpoint_rebuilding_mask(
    layer: nn.Module, forward: Callable[..., Any], rebuild: Callable[[], Tensor], args: tuple, kwargs: dict[str, Any]
) -> Any:
    """Checkpoint ``layer`` keeping its reference boxes instead of its (R, heads, Q+1, HW) attention mask."""
    holder = [kwargs.pop(MASK_KWARG)]

    def run(*inner: Any) -> Any:  # the forward uses the decoder's mask, the recomputation rebuilds it
        mask = holder[0] if holder[0] is not None else rebuild()
        return forward(layer, *inner, **{MASK_KWARG: mask}, **kwargs)

    try:
        return layer._gradient_checkpointing_func(run, *args)
    finally:
        holder[0] = None


def checkpoint_kept_inputs(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    """The arguments a checkpointing block keeps for its recomputation (for ``sam3lora.perf.saved_bytes``)."""
    if _mask_rebuilder(module, kwargs) is None:
        return args, kwargs
    boxes, _ = module.__dict__[_DECODER][0].__dict__[_RPB_ARGS]
    return args, {**{k: v for k, v in kwargs.items() if k != MASK_KWARG}, "reference_boxes": boxes}


def _install(block: nn.Module, decoder: nn.Module | None = None) -> None:
    if not block.__dict__.get(_INSTALLED):
        block.forward = types.MethodType(_checkpointing_forward, block)
        block.gradient_checkpointing = False
        setattr(block, _INSTALLED, True)
    if decoder is not None and hasattr(type(decoder), "_get_rpb_matrix"):
        block.__dict__[_DECODER] = (decoder,)
        decoder.__dict__["_get_rpb_matrix"] = types.MethodType(_recording_rpb, decoder)


def _uninstall(block: nn.Module, decoder: nn.Module | None = None) -> None:
    for name in ("forward", "gradient_checkpointing", "_gradient_checkpointing_func", _INSTALLED, _DECODER):
        block.__dict__.pop(name, None)
    if decoder is not None:
        for name in ("_get_rpb_matrix", _RPB_ARGS, _RPB_CHECKED):
            decoder.__dict__.pop(name, None)


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
    base = unwrap_base(model)
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
    base = unwrap_base(model)
    for name, layer in layers.items():
        plain = not isinstance(layer, GradientCheckpointingLayer)
        decoder = base.detr_decoder if name.startswith("detr_decoder.") else None
        if not enabled:
            if plain:
                _uninstall(layer, decoder)
            else:
                layer.gradient_checkpointing = False
                layer.__dict__.pop("_gradient_checkpointing_func", None)
            continue
        if plain:
            _install(layer, decoder)
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
