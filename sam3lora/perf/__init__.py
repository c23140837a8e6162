"""Speed and memory switches of the training step (``module.perf`` in ``conf/module/default.yaml``).

Measured by ``scripts/benchmark.py``; see ``docs/performance.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from sam3lora.model.load_base import DTYPES
from sam3lora.perf.checkpointing import AUTO, CHECKPOINTABLE, ENCODERS, RecomputeFlops, set_activation_checkpointing
from sam3lora.perf.compile import compile_options
from sam3lora.perf.feature_cache import (
    CACHE_MODES,
    FeatureCacheError,
    TextFeatureCache,
    VisionFeatureCache,
    check_deterministic,
    check_frozen,
)
from sam3lora.perf.precision import base_autocast, prepare_low_precision_base

__all__ = [
    "CHECKPOINTABLE",
    "ENCODERS",
    "FeatureCacheError",
    "PerfSettings",
    "RecomputeFlops",
    "TextFeatureCache",
    "VisionFeatureCache",
    "base_autocast",
    "check_deterministic",
    "check_frozen",
    "prepare_low_precision_base",
    "set_activation_checkpointing",
]


@dataclass
class PerfSettings:
    """Speed/memory switches; all off in ``conf/module/default.yaml`` (``module.perf``, the one place the values are
    stated: ``sam3lora.config.defaults("module/default.perf", ...)``); each trades something (``docs/performance.md``).

    Attributes:
        activation_checkpointing: recompute blocks in backward instead of keeping their activations.
            ``true`` = vision and text encoders (``ENCODERS``), or a list of components from ``CHECKPOINTABLE``
            (``vision_encoder``, ``text_encoder``, ``geometry_encoder``, ``detr_encoder``, ``detr_decoder``,
            ``mask_decoder``), or ``auto``: on the first training batch, the set with the least recomputation
            whose estimated step memory fits ``memory_budget_gb`` (``sam3lora.perf.memory_plan``; printed).
        memory_budget_gb: what ``auto`` plans for; null = the device's free memory less 10%.
        base_dtype: null (the base as loaded, ``model.dtype``) or ``bfloat16 | float16``: the frozen base weights
            cast to this dtype, trainable ones kept float32, the forward under autocast to it; no per-step weight
            casts are saved for backward (``sam3lora.perf.precision.cast_frozen_base``).
        cache_vision_features: ``false | memory | disk`` (``true`` = memory). Compute each image's vision features
            once and reuse them in later epochs; needs a frozen, un-adapted vision encoder (``lora=minimal``) and
            deterministic training transforms.
        vision_cache_dir: where ``disk`` mode writes (one file per image, namespaced by base weights, data root,
            split and transforms).
        vision_cache_dtype: store cached vision features as ``float32 | bfloat16 | float16``; null keeps the dtype
            they were computed in.
        cache_text_features: compute the text encoder's output once per distinct prompt; needs a frozen,
            un-adapted text encoder (every shipped preset but ``full``).
        compile: ``torch.compile`` the per-row heads and the loss's per-pixel terms (``sam3lora.perf.compile``):
            ``true`` (inductor) or a mapping of ``torch.compile`` arguments (``backend``, ``mode``, ``dynamic``,
            ``fullgraph``).
    """

    activation_checkpointing: bool | list[str]
    cache_vision_features: bool | str
    vision_cache_dir: str | None
    vision_cache_dtype: str | None
    cache_text_features: bool
    base_dtype: str | None
    memory_budget_gb: float | None
    compile: bool | dict[str, Any]

    def __post_init__(self) -> None:
        ckpt = self.activation_checkpointing
        if isinstance(ckpt, str) and ckpt != AUTO:
            raise ValueError(f"module.perf.activation_checkpointing: true, false, auto or a list of {CHECKPOINTABLE}")
        if not isinstance(ckpt, (bool, str)):
            ckpt = list(ckpt)
            unknown = sorted(set(ckpt) - set(CHECKPOINTABLE))
            if unknown:
                raise ValueError(
                    f"module.perf.activation_checkpointing: unknown component(s) {unknown}; known: {CHECKPOINTABLE}"
                )
            self.activation_checkpointing = ckpt
        mode = self.cache_vision_features
        if mode is True:
            self.cache_vision_features = "memory"
        elif mode not in (False, None, *CACHE_MODES):
            raise ValueError(f"module.perf.cache_vision_features: false, memory or disk, got {mode!r}")
        if self.cache_vision_features is None:
            self.cache_vision_features = False
        if self.vision_cache_dtype is not None and self.vision_cache_dtype not in DTYPES:
            known = sorted(DTYPES)
            raise ValueError(f"module.perf.vision_cache_dtype: null or one of {known}, got {self.vision_cache_dtype!r}")
        if self.cache_vision_features == "disk" and not self.vision_cache_dir:
            raise ValueError("module.perf.vision_cache_dir must be set when cache_vision_features is 'disk'")
        self.cache_text_features = bool(self.cache_text_features)
        if self.base_dtype is not None and self.base_dtype not in DTYPES:
            raise ValueError(f"module.perf.base_dtype: null or one of {sorted(DTYPES)}, got {self.base_dtype!r}")
        if self.memory_budget_gb is not None and not self.memory_budget_gb > 0:
            raise ValueError(f"module.perf.memory_budget_gb: null or a positive number, got {self.memory_budget_gb!r}")
        compile_options(self.compile)  # a bad value fails here, naming the key

    @property
    def checkpoint_components(self) -> list[str]:
        """The components to checkpoint now (none for ``auto`` until its plan is made)."""
        ckpt = self.activation_checkpointing
        if ckpt is True:
            return list(ENCODERS)
        return list(ckpt) if ckpt and ckpt != AUTO else []

    @property
    def compile_options(self) -> dict[str, Any] | None:
        """``torch.compile`` keyword arguments, or None when ``compile`` is off."""
        return compile_options(self.compile)

    @property
    def cache_dtype(self) -> torch.dtype | None:
        return None if self.vision_cache_dtype is None else DTYPES[self.vision_cache_dtype]
