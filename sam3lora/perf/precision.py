"""Frozen base weights in bfloat16 (or float16) with float32 adapters.

``model.dtype=bfloat16`` loads the base in bfloat16: half the weight memory. PEFT keeps LoRA weights in float32
(``autocast_adapter_dtype``), but a ``modules_to_save`` copy inherits the base dtype, and a bfloat16 base cannot
take float32 inputs (pixels, boxes) or run beside float32 adapters without autocast. :func:`prepare_low_precision_base`
makes every trainable parameter float32 (so the optimiser updates full-precision weights) and
:func:`base_autocast` gives the autocast context the forward needs when the trainer does not provide one.

Two things keep autocast from saving copies for backward (``tests/test_saved_bytes.py`` counts them):

- a float32 frozen base under autocast is cast to the compute dtype again by every op, every step, and each
  cast of a weight on the gradient path is saved for backward: :func:`cast_frozen_base`
  (``module.perf.base_dtype``) keeps the frozen weights in the compute dtype instead;
- PEFT's LoRA ``Linear`` casts its input to the adapter dtype (float32) and autocast casts it back for the
  adapter's matmul, and the q/k/v adapters of one hidden state each make their own cast: several saved copies
  of the same activation. :func:`single_input_cast` casts each input once, before all of them (``_cast_once``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import Tensor, nn

from sam3lora.lora import unwrap_base
from sam3lora.model.load_base import DTYPES

LOW_PRECISION = (torch.bfloat16, torch.float16)
_CAST = "_sam3lora_cast"  # on a LoRA layer's float32 input: ((version, dtype), its autocast-dtype copy)


def base_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of most frozen floating-point base weights (by element count)."""
    counts: dict[torch.dtype, int] = {}
    for param in model.parameters():
        if not param.requires_grad and param.is_floating_point():
            counts[param.dtype] = counts.get(param.dtype, 0) + param.numel()
    return max(counts, key=counts.__getitem__) if counts else torch.float32


def cast_frozen_base(model: nn.Module, dtype: str) -> int:
    """Cast the frozen floating-point parameters and buffers of ``model`` to ``dtype`` (``module.perf.base_dtype``).

    Trainable parameters (LoRA weights, ``modules_to_save`` copies) keep their dtype, so nothing the optimiser
    updates is rounded; the result is the base ``model.dtype=<dtype>`` loads. Returns how many tensors changed.
    """
    if dtype not in DTYPES:
        raise ValueError(f"module.perf.base_dtype: null or one of {sorted(DTYPES)}, got {dtype!r}")
    target = DTYPES[dtype]
    changed = 0
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if not param.requires_grad and param.is_floating_point() and param.dtype != target:
                param.data = param.data.to(target)
                changed += 1
        for name, buffer in module.named_buffers(recurse=False):
            if buffer.is_floating_point() and buffer.dtype != target:
                setattr(module, name, buffer.to(target))
                changed += 1
    return changed


def _cast_once(layer: nn.Module, args: tuple) -> tuple | None:
    """Forward pre-hook of a PEFT LoRA ``Linear``: under autocast, one cast of an input for every layer that reads
    it (base matmul and adapter alike).

    The input ``x`` (..., in) is cast to the autocast dtype here when autocast would cast it (float32), and PEFT's
    own cast to the adapter dtype is off meanwhile, so the base matmul and the adapter's ``lora_A`` get (and
    save) the same tensor; the q/k/v projections of one hidden state share the one cast (kept on the input
    tensor itself, so it lives as long as the input; a modified input is cast again). Outside autocast PEFT
    casts as usual (a float32 adapter beside a bfloat16 base).
    """
    x = args[0] if args else None
    if not isinstance(x, Tensor) or not torch.is_autocast_enabled(x.device.type):
        layer.cast_input_dtype_enabled = True
        return None
    layer.cast_input_dtype_enabled = False
    dtype = torch.get_autocast_dtype(x.device.type)
    if x.dtype != torch.float32 or dtype == torch.float32:
        return None
    if x.is_inference():  # inference mode saves nothing for backward and tensors carry no version: cast, no cache
        return (x.to(dtype), *args[1:])
    key, cast = x.__dict__.get(_CAST, (None, None))
    if key != (x._version, dtype):
        cast = x.to(dtype)
        x.__dict__[_CAST] = ((x._version, dtype), cast)
    return (cast, *args[1:])


def single_input_cast(model: nn.Module, enabled: bool = True) -> int:
    """Install (or remove) :func:`_cast_once` on every LoRA ``Linear`` of ``model``; returns how many layers."""
    layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
    for layer in layers:
        handle = layer.__dict__.pop("_sam3lora_cast_once", None)
        if handle is not None:
            handle.remove()
        layer.cast_input_dtype_enabled = True
        if enabled:
            layer.__dict__["_sam3lora_cast_once"] = layer.register_forward_pre_hook(_cast_once)
    return len(layers)


def prepare_low_precision_base(model: nn.Module) -> torch.dtype | None:
    """For a bfloat16/float16 base: float32 trainable parameters, float32 geometry-encoder feature norm.

    Any base: one cast of each LoRA layer's input under autocast (:func:`single_input_cast`).

    The geometry encoder's ``vision_layer_norm`` is made float32 because on the CPU ``roi_align`` must get float32
    features under autocast (see ``sam3lora.training.module._fp32_roi_features_on_cpu``) and a CPU layer norm
    cannot take float32 input with bfloat16 weights; on GPUs autocast runs layer norms in float32 anyway.

    Returns:
        The low-precision base dtype, or None when the base is float32 (nothing changed).
    """
    single_input_cast(model)
    dtype = base_dtype(model)
    if dtype not in LOW_PRECISION:
        return None
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    base = unwrap_base(model)
    norm = getattr(getattr(base, "geometry_encoder", None), "vision_layer_norm", None)
    if norm is not None:
        norm.float()
    return dtype


@contextlib.contextmanager
def base_autocast(dtype: torch.dtype | None, device: torch.device) -> Iterator[None]:
    """Autocast to ``dtype`` on ``device`` unless ``dtype`` is None or autocast is already on there."""
    if dtype is None or torch.is_autocast_enabled(device.type):
        yield
        return
    with torch.autocast(device.type, dtype=dtype):
        yield
