"""Attention masks built without a host read: no ``padding_mask.all()`` per mask in a SAM 3 forward.

For SDPA, transformers' mask builders first ask whether the 2-D padding mask pads anything, to return no mask
(SDPA then runs unmasked, or with ``is_causal``) when it does not: ``masking_utils._ignore_causal_mask_sdpa``
(``fast_all`` twice, for the CLIP text encoder's ``create_causal_mask``) and ``_ignore_bidirectional_mask_sdpa``
(``padding_mask.all()``, for ``create_bidirectional_mask`` in SAM 3's geometry encoder, DETR encoder, DETR decoder
and mask decoder). Each answer is a device->host read: 7 per training step of the tiny model (the DAC pass runs
the decoder twice). SAM 3's prompts nearly always pad (32-token texts, a padding box on each text-only row), so
the answer is "it pads" and the mask is built anyway.

:func:`materialise_attention_masks` moves those components to the attention implementation ``MATERIALISED``:
transformers' own SDPA attention (registered with ``AttentionInterface``) and transformers' own ``sdpa_mask`` with
both skips off (registered with ``AttentionMaskInterface``, transformers' documented way to customise masks).
Whenever a batch pads, the masks are the same tensors as before and every output is bitwise equal; in a batch that
pads nothing (all prompt slots filled) SDPA gets an all-True mask instead of none: the same attention, possibly
another SDPA kernel (float rounding). ``torch.compile`` does the same already (transformers skips the check while
tracing). Only modules configured for ``sdpa`` are switched; eager, flash and flex attention are left alone.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import Tensor, nn
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

#: the attention implementation: SDPA with masks always materialised
MATERIALISED = "sam3lora_sdpa"
#: ``Sam3Model`` components that build padding masks (the vision encoder builds none)
MASKED_COMPONENTS = ("text_encoder", "geometry_encoder", "detr_encoder", "detr_decoder", "mask_decoder")
_SKIPS = ("allow_is_causal_skip", "allow_is_bidirectional_skip")


def _materialised_sdpa_mask(*args: Any, **kwargs: Any) -> Tensor | None:
    """transformers' ``sdpa_mask`` without the "no padding: no mask" shortcut (which reads the mask on the host)."""
    return sdpa_mask(*args, **{**kwargs, **dict.fromkeys(_SKIPS, False)})


def _register() -> bool:
    """Register ``MATERIALISED`` (idempotent); False when this transformers' ``sdpa_mask`` lacks the skip switches."""
    if not set(_SKIPS) <= inspect.signature(sdpa_mask).parameters.keys():
        return False
    AttentionInterface.register(MATERIALISED, ALL_ATTENTION_FUNCTIONS["sdpa"])
    AttentionMaskInterface.register(MATERIALISED, _materialised_sdpa_mask)
    return True


def materialise_attention_masks(base: nn.Module) -> list[str]:
    """Switch the SDPA configs of ``base``'s ``MASKED_COMPONENTS`` (a ``Sam3Model``) to ``MATERIALISED``.

    Idempotent; returns the components now on ``MATERIALISED`` (none with another attention implementation or a
    transformers whose ``sdpa_mask`` has no skip switches: their masks stay as transformers builds them).
    """
    if not _register():
        return []
    switched = []
    for name in MASKED_COMPONENTS:
        module = getattr(base, name, None)
        configs = {id(c): c for m in (module.modules() if module else ()) if (c := getattr(m, "config", None))}
        for config in configs.values():
            if getattr(config, "_attn_implementation", None) == "sdpa":
                config._attn_implementation = MATERIALISED
        if configs and all(c._attn_implementation == MATERIALISED for c in configs.values()):
            switched.append(name)
    return switched
