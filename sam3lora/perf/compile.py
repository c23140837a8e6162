"""``torch.compile`` of the per-row heads and the loss (``module.perf.compile``).

The heads (DETR encoder and decoder, mask decoder) run once per (image, prompt) row and are many small kernels;
the loss's per-pixel mask terms (focal + Dice over the matched masks at the mask resolution) are element-wise
chains that a compiler fuses. The encoders, once per image or prompt, are left as they are (large matrix
products gain little), and so is the matching (host code, ``sam3lora.loss.matcher``).

Compilation is per module (``nn.Module.compile``: the forward hooks this project installs run inside the compiled
call) and undone by :func:`set_compile` with ``None``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from sam3lora.errors import Sam3LoRAError
from sam3lora.lora import unwrap_base

#: modules of ``Sam3Model`` that run once per row and are compiled
COMPILED_HEADS = ("detr_encoder", "detr_decoder", "mask_decoder")
#: ``torch.compile`` arguments ``module.perf.compile`` may set
COMPILE_KEYS = ("backend", "mode", "dynamic", "fullgraph")


class CompileSettingsError(Sam3LoRAError, ValueError):
    """``module.perf.compile`` is neither a switch nor a mapping of ``torch.compile`` arguments."""


def compile_options(value: bool | Mapping[str, Any] | None) -> dict[str, Any] | None:
    """``module.perf.compile`` -> ``torch.compile`` keyword arguments, or None when off.

    ``false``/``null`` is off, ``true`` is ``torch.compile``'s defaults (inductor), a mapping picks any of
    ``COMPILE_KEYS`` (e.g. ``{backend: aot_eager}`` on a machine without a C++ compiler).
    """
    if value is None or value is False:
        return None
    if value is True:
        return {}
    if not isinstance(value, Mapping):
        raise CompileSettingsError(f"module.perf.compile: true, false or a mapping of {COMPILE_KEYS}, got {value!r}")
    unknown = sorted(set(value) - set(COMPILE_KEYS))
    if unknown:
        raise CompileSettingsError(f"module.perf.compile: unknown key(s) {unknown}; known: {list(COMPILE_KEYS)}")
    return {k: v for k, v in value.items() if v is not None}


def set_compile(model: nn.Module, criterion: nn.Module, options: Mapping[str, Any] | None) -> None:
    """Compile (``options``: ``torch.compile`` kwargs) or un-compile (None) the heads of ``model`` and the loss.

    ``criterion`` is compiled through its ``compile_terms(options)`` when it has one (``Sam3Criterion``).
    """
    base = unwrap_base(model)
    for name in COMPILED_HEADS:
        head = base.get_submodule(name)
        if options is None:
            head._compiled_call_impl = None  # nn.Module.compile's slot: back to the eager forward
        else:
            head.compile(**options)
    compile_terms = getattr(criterion, "compile_terms", None)
    if compile_terms is not None:
        compile_terms(options)
