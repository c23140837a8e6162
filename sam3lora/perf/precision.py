"""Frozen base weights in bfloat16 (or float16) with float32 adapters.

``model.dtype=bfloat16`` loads the base in bfloat16: half the weight memory. PEFT keeps LoRA weights in float32
(``autocast_adapter_dtype``), but a ``modules_to_save`` copy inherits the base dtype, and a bfloat16 base cannot
take float32 inputs (pixels, boxes) or run beside float32 adapters without autocast. :func:`prepare_low_precision_base`
makes every trainable parameter float32 (so the optimiser updates full-precision weights) and
:func:`base_autocast` gives the autocast context the forward needs when the trainer does not provide one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from sam3lora.lora import unwrap_base

LOW_PRECISION = (torch.bfloat16, torch.float16)


def base_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of most frozen floating-point base weights (by element count)."""
    counts: dict[torch.dtype, int] = {}
    for param in model.parameters():
        if not param.requires_grad and param.is_floating_point():
            counts[param.dtype] = counts.get(param.dtype, 0) + param.numel()
    return max(counts, key=counts.__getitem__) if counts else torch.float32


def prepare_low_precision_base(model: nn.Module) -> torch.dtype | None:
    """For a bfloat16/float16 base: float32 trainable parameters, float32 geometry-encoder feature norm.

    The geometry encoder's ``vision_layer_norm`` is made float32 because on the CPU ``roi_align`` must get float32
    features under autocast (see ``sam3lora.training.module._fp32_roi_features_on_cpu``) and a CPU layer norm
    cannot take float32 input with bfloat16 weights; on GPUs autocast runs layer norms in float32 anyway.

    Returns:
        The low-precision base dtype, or None when the base is float32 (nothing changed).
    """
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
