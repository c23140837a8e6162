"""Feature-map sizes kept on the host for transformers' ``Sam3DetrDecoder``: no ``.item()`` per decoder layer.

``Sam3DetrEncoder`` returns ``spatial_shapes``, the (levels, 2) sizes of its feature maps, as a tensor on the
model's device, built from Python ints. The decoder reads ``spatial_shapes[0, 0]`` and ``[0, 1]`` in every layer
to build the box relative-position bias, and its ``_get_coords`` turns them into ``torch.arange(0, height)``: a
device->host read (``aten._local_scalar_dense``) of each, per layer, per decoder pass (two per layer and pass:
24 per training step of the full-size model with the DAC pass). Its ``lru_cache`` never hits either, since
tensors hash by identity.

:func:`keep_spatial_shapes_on_host` hooks the encoder so that its output carries the same sizes as a NumPy int64
array built from the feature maps' shapes (already on the host): the decoder indexes it exactly as the tensor
(``.shape[0]``, ``[0, 0]``), ``torch.arange`` takes its integers without a synchronisation, and the decoder's
coordinate cache hits (NumPy integers hash by value). The values, and so every output, are unchanged.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import nn

_HOOKED = "_sam3lora_host_shapes"


def _host_spatial_shapes(_module: nn.Module, _args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
    """Forward hook on ``detr_encoder``: ``output.spatial_shapes`` as a (levels, 2) int64 NumPy array.

    ``vision_features`` is the encoder's list of (B, C, H, W) maps (the encoder reshapes a flattened input in
    place before use, so the list holds 4-D maps by now).
    """
    features = kwargs.get("vision_features")
    spatial = getattr(output, "spatial_shapes", None)
    if features is None or spatial is None or any(f.dim() != 4 for f in features):
        return None  # called another way: leave transformers' tensor
    output.spatial_shapes = np.array([tuple(f.shape[-2:]) for f in features], dtype=np.int64)
    return output


def keep_spatial_shapes_on_host(base: nn.Module) -> None:
    """Hook ``base.detr_encoder`` of a ``Sam3Model`` (idempotent); a model without one is left alone."""
    encoder = getattr(base, "detr_encoder", None)
    if encoder is None or getattr(encoder, _HOOKED, False):
        return
    encoder.register_forward_hook(_host_spatial_shapes, with_kwargs=True)
    setattr(encoder, _HOOKED, True)
