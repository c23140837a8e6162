"""One-to-many (DAC) queries around transformers' ``Sam3DetrDecoder``, for training only.

The official SAM 3 decoder built with ``dac=True`` runs 2Q queries in training: the first Q as usual, the
second Q a copy (same query embeddings and reference boxes) that skips self-attention: its self-attention
sublayer reduces to the layer norm, ``norm(x + 0)``, while text/vision cross-attention (with the box relative
position bias of its own reference boxes), the MLP and every head are shared. No sublayer mixes the two halves
(self-attention sees the first half and the presence token only), so the first half's outputs are exactly the
model's usual outputs, and the copy equals a second decoder pass whose self-attention outputs are zero.

That second pass is what :func:`dac_outputs` runs, through transformers' own decoder: an extra keyword
(:data:`DAC_KWARG`), which the decoder hands on to each layer and each layer to its attention modules, tells
the forward hooks from :func:`install_dac_hooks` to zero the self-attention output. A keyword rather than a
flag, so that a recomputation under activation checkpointing replays the same pass. Nothing is added to the
model's weights or config: prediction, export and merged models never see these queries.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torchvision.ops import box_convert
from transformers.models.sam3.modeling_sam3 import inverse_sigmoid

from sam3lora.errors import Sam3LoRAError
from sam3lora.model.mask_product import MaskProduct

DAC_KWARG = "sam3lora_dac"
_HOOKED = "_sam3lora_dac_hooked"


class DacError(Sam3LoRAError, RuntimeError):
    """The model cannot run the one-to-many (DAC) queries."""


def _zero_self_attention(module: nn.Module, _args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
    """Forward hook on a decoder layer's ``self_attn``: zero its output in the DAC pass."""
    if not kwargs.get(DAC_KWARG):
        return None
    module._sam3lora_dac_calls = getattr(module, "_sam3lora_dac_calls", 0) + 1
    return (torch.zeros_like(output[0]), *output[1:])


def install_dac_hooks(base: nn.Module) -> None:
    """Hook every ``detr_decoder.layers[i].self_attn`` of a ``Sam3Model`` (idempotent).

    Raises ``DacError`` when the model has no transformers-style DETR decoder with self-attention layers.
    """
    decoder = getattr(base, "detr_decoder", None)
    layers = getattr(decoder, "layers", None)
    if decoder is None or not layers or not all(hasattr(layer, "self_attn") for layer in layers):
        raise DacError(
            f"loss.o2m.enabled: {type(base).__name__} has no detr_decoder.layers[*].self_attn to run the DAC "
            "queries through; set loss.o2m.enabled=false"
        )
    if getattr(decoder, _HOOKED, False):
        return
    for layer in layers:
        layer.self_attn.register_forward_hook(_zero_self_attention, with_kwargs=True)
    setattr(decoder, _HOOKED, True)


def dac_outputs(base: nn.Module, decoder_inputs: dict[str, Any], instance_embeds: Tensor) -> dict[str, Any]:
    """Outputs of the DAC query copy, in the criterion's format.

    Args:
        base: the (unwrapped) ``Sam3Model`` whose forward just ran, hooked by :func:`install_dac_hooks`.
        decoder_inputs: the keyword arguments of that forward's ``detr_decoder`` call.
        instance_embeds: that forward's ``mask_decoder.instance_projection`` output, (R, C, h, w).
    Returns:
        ``pred_logits (R,Q)``, ``pred_boxes (R,Q,4)`` normalised xyxy, ``pred_masks`` (R,Q,h,w) logits as a
        ``MaskProduct`` and ``aux_outputs`` (earlier layers' ``pred_logits``, ``pred_boxes``). No presence: as in
        the official model, the presence token belongs to the one-to-one half.
    """
    decoder = base.detr_decoder
    for layer in decoder.layers:
        layer.self_attn._sam3lora_dac_calls = 0
    out = decoder(**decoder_inputs, **{DAC_KWARG: True})
    if any(getattr(layer.self_attn, "_sam3lora_dac_calls", 0) != 1 for layer in decoder.layers):
        raise DacError(
            "DAC queries: transformers' detr_decoder did not pass the DAC keyword to every layer's self-attention "
            "(changed transformers version?); set loss.o2m.enabled=false"
        )
    hidden = out.intermediate_hidden_states  # (L,R,Q,D), after the output layer norm
    logits = base.dot_product_scoring(
        decoder_hidden_states=hidden,
        text_features=decoder_inputs["text_features"],
        text_mask=decoder_inputs.get("text_mask"),
    ).squeeze(-1)  # (L,R,Q)
    cxcywh = (inverse_sigmoid(out.reference_boxes) + decoder.box_head(hidden)).sigmoid()
    boxes = box_convert(cxcywh, "cxcywh", "xyxy")  # (L,R,Q,4)
    # the mask decoder's instance masks: per-query embedding . per-pixel embedding (pixels shared with the o2o half),
    # evaluated for the matched queries only; .forward: the one-to-one half's mask hook is not for these queries
    masks = MaskProduct(base.mask_decoder.mask_embedder.forward(hidden[-1]), instance_embeds)
    aux = [{"pred_logits": logits[i], "pred_boxes": boxes[i]} for i in range(hidden.shape[0] - 1)]
    return {"pred_logits": logits[-1], "pred_boxes": boxes[-1], "pred_masks": masks, "aux_outputs": aux}
