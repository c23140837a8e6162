"""Feature-map sizes kept on the host for transformers' ``Sam3DetrDecoder``: no ``.item()`` per decoder layer.

``Sam3DetrEncoder`` returns ``spatial_shapes``, the (levels, 2) sizes of its feature maps, as a tensor on the
model's device, built from Python ints. The decoder reads ``spatial_shapes[0, 0]`` and ``[0, 1]`` in every layer
to build the box relative-position bias, and its ``_get_coords`` turns them into ``torch.arange(0, height)``: a
device->host read (``aten._local_scalar_dense``) of each, per layer, per decoder pass (two per layer and pass:
24 per training step of the full-size model with the DAC pass). Its ``lru_cache`` never hits either, since
tensors hash by identity.

:func:`keep_spatial_shapes_on_host` hooks the encoder so that its output carries the same sizes as Python ints
(:class:`HostShapes`, from the feature maps' shapes, already on the host): the decoder indexes them exactly as the
tensor (``.shape[0]``, ``[0, 0]``), ``torch.arange`` takes them without a synchronisation, the decoder's coordinate
cache hits and ``torch.compile`` sees constants. The values, and so every output, are unchanged.
"""

from __future__ import annotations

from typing import Any

from torch import nn

_HOOKED = "_sam3lora_host_shapes"


class HostShapes(tuple):
    """(levels, 2) feature-map sizes as Python ints, read like transformers' ``spatial_shapes`` tensor.

    ``shape`` and ``[level, axis]`` indexing behave as on the tensor; the values are ints, so ``torch.arange``
    needs no device read, ``torch.compile`` sees constants, and ``lru_cache`` keys hash by value.
    """

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self), 2)

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, tuple):
            level, axis = key
            return tuple.__getitem__(self, level)[axis]
        return tuple.__getitem__(self, key)


def _host_spatial_shapes(_module: nn.Module, _args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
    """Forward hook on ``detr_encoder``: ``output.spatial_shapes`` as :class:`HostShapes`.

    ``vision_features`` is the encoder's list of (B, C, H, W) maps (the encoder reshapes a flattened input in
    place before use, so the list holds 4-D maps by now).
    """
    features = kwargs.get("vision_features")
    spatial = getattr(output, "spatial_shapes", None)
    if features is None or spatial is None or any(f.dim() != 4 for f in features):
        return None  # called another way: leave transformers' tensor
    output.spatial_shapes = HostShapes((int(f.shape[-2]), int(f.shape[-1])) for f in features)
    return output


def keep_spatial_shapes_on_host(base: nn.Module) -> None:
    """Hook ``base.detr_encoder`` of a ``Sam3Model`` (idempotent); a model without one is left alone."""
    encoder = getattr(base, "detr_encoder", None)
    if encoder is None or getattr(encoder, _HOOKED, False):
        return
    encoder.register_forward_hook(_host_spatial_shapes, with_kwargs=True)
    setattr(encoder, _HOOKED, True)
