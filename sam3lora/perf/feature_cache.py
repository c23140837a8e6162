"""Feature caches for frozen, un-adapted encoders.

When a LoRA preset leaves the vision encoder frozen and without adapters (``lora=minimal``), its features of a
given image never change: :class:`VisionFeatureCache` computes them once per image (keyed by image id and a
fingerprint of where the pixels came from: dataset root, split, transform pipeline, size) and later epochs skip
the encoder. That is only valid when the transforms are deterministic (no random resize, no augmentation):
:func:`random_ops` finds the random ops of a pipeline and :func:`check_deterministic` refuses with a clear error.
As a runtime guard each entry keeps a fingerprint of its pixels; a hit whose pixels differ raises.

:class:`TextFeatureCache` does the same for a frozen text encoder, once per distinct prompt text.
Only the text encoder's output is cached; ``text_projection`` runs every step (it may be trained).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from transformers.models.sam3.modeling_sam3 import Sam3VisionEncoderOutput

from sam3lora.errors import Sam3LoRAError
from sam3lora.lora import unwrap_base

CACHE_MODES = ("memory", "disk")
#: albumentations ops that are the same on every call (with these arguments)
_DETERMINISTIC_OPS = {"Resize", "LongestMaxSize", "SmallestMaxSize", "Normalize", "ToFloat", "FromFloat"}


class FeatureCacheError(Sam3LoRAError, ValueError):
    """A feature cache cannot be used with this model or data; the message says why and what to do."""


# ----------------------------------------------------------------------------------------------- checks


def frozen_problems(model: nn.Module, component: str) -> list[str]:
    """Why the features of ``component`` could change between calls (empty: they cannot).

    Trainable parameters (adapters, ``modules_to_save``) and dropout that is active in training make features
    vary; frozen adapters are fine (they are constant).
    """
    module = unwrap_base(model).get_submodule(component)
    problems = [f"{component}.{n} is trainable" for n, p in module.named_parameters() if p.requires_grad]
    for name, sub in module.named_modules():
        if isinstance(sub, nn.Dropout) and sub.p > 0:
            problems.append(f"{component}.{name} is dropout with p={sub.p}")
        p = getattr(sub, "attention_dropout", 0.0)
        if isinstance(p, float) and p > 0:
            problems.append(f"{component}.{name} has attention dropout {p}")
    return problems


def check_frozen(model: nn.Module, component: str, key: str) -> None:
    """Raise :class:`FeatureCacheError` (naming the config ``key``) unless ``component`` is frozen and un-adapted."""
    problems = frozen_problems(model, component)
    if problems:
        raise FeatureCacheError(
            f"{key} needs a frozen, un-adapted {component}, but {len(problems)} thing(s) change its features, e.g. "
            f"{problems[:3]}. Use a LoRA preset that leaves the {component} alone (lora=minimal), or turn {key} off"
        )


def _ops(pipeline: Any) -> Iterable[Any]:
    """Every op of an albumentations pipeline, nested compositions (OneOf, Sequential, ...) included."""
    import albumentations as A

    for op in getattr(pipeline, "transforms", []):
        yield op
        if isinstance(op, A.BaseCompose):
            yield from _ops(op)


def random_ops(pipeline: Any) -> list[str]:
    """Names of the ops of an albumentations pipeline that can differ between calls (p > 0 and random)."""
    found = []
    for op in _ops(pipeline):
        name = type(op).__name__
        if getattr(op, "p", 1.0) == 0:
            continue
        if name == "PadIfNeeded" and getattr(op, "position", "center") != "random":
            continue
        if name in _DETERMINISTIC_OPS or name in ("Compose", "Sequential"):
            continue
        found.append(name if name not in ("OneOf", "SomeOf") else f"{name} (random choice)")
    return found


def check_deterministic(datamodule: Any, key: str = "module.perf.cache_vision_features") -> None:
    """Refuse a data module whose training transforms are random (the cache would freeze one random draw).

    Works on :class:`~sam3lora.data.datamodule.Sam3DataModule` (its ``train_transform.pipeline``); other data
    modules are accepted (the cache's pixel fingerprint still catches changing pixels at the first repeat).
    """
    transform = getattr(datamodule, "train_transform", None)
    pipeline = getattr(transform, "pipeline", None)
    if pipeline is None:
        return
    found = random_ops(pipeline)
    if found:
        raise FeatureCacheError(
            f"{key} caches each image's vision features across epochs, which needs deterministic training "
            f"transforms, but data.train_transforms has random op(s) {found}. Use a resize-only pipeline "
            "(data.train_transforms='${data.val_transforms}', i.e. resize: stretch and no augment) or turn the cache "
            "off"
        )


def transform_fingerprint(datamodule: Any, stage: str) -> str:
    """Where a split's pixels come from: dataset root, split name, transform pipeline, image size (a short hash).

    Falls back to ``stage`` alone for data modules that are not a Sam3DataModule.
    """
    transform = getattr(datamodule, "train_transform" if stage == "train" else "val_transform", None)
    splits = getattr(datamodule, "splits", {})
    parts = [
        stage,
        str(getattr(datamodule, "root", "")),
        str(splits.get(stage, "")),
        str(getattr(datamodule, "image_size", "")),
        repr(getattr(transform, "pipeline", None)),
        repr(getattr(transform, "mean", None)),
        repr(getattr(transform, "std", None)),
    ]
    if transform is None:
        return stage
    return f"{stage}-" + hashlib.sha1("|".join(parts).encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------------------------- vision


def pixel_fingerprints(pixel_values: Tensor) -> Tensor:
    """(I, 3, H, W) -> float64 (I, 4): a cheap guard against changed pixels.

    Sum and sum of squares of each image, and its sums weighted by column and by row index (so that a flip or a
    shift, which keep the first two, changes the fingerprint too).
    """
    p = pixel_values.detach().double()
    cols = torch.arange(p.shape[-1], device=p.device, dtype=p.dtype)
    rows = torch.arange(p.shape[-2], device=p.device, dtype=p.dtype)
    return torch.stack(
        [p.sum((1, 2, 3)), p.square().sum((1, 2, 3)), (p.sum((1, 2)) * cols).sum(-1), (p.sum((1, 3)) * rows).sum(-1)],
        dim=1,
    ).cpu()


class _Entry(NamedTuple):
    fingerprint: Tensor  # float64 (4,): see pixel_fingerprints
    levels: tuple[Tensor, ...]  # (C, h, w) per FPN level, as stored
    dtype: torch.dtype  # dtype they were computed in (restored on load)


class VisionFeatureCache:
    """Vision features (``fpn_hidden_states``) per image, in memory (CPU) or on disk.

    Position encodings depend only on the feature shapes and are recomputed by the encoder's own neck.

    Args:
        mode: ``memory`` (CPU RAM) or ``disk`` (one ``.pt`` file per image under ``directory``).
        directory: disk mode only; entries live under ``directory/<namespace>/<image_id>.pt``.
        dtype: store in this dtype (None: as computed; ``torch.bfloat16`` halves the size).
        base_key: identity of the frozen encoder (e.g. its weights' fingerprint): part of every disk namespace,
            so a cache written for another base model is never read.
    """

    def __init__(
        self,
        mode: str = "memory",
        directory: str | Path | None = None,
        dtype: torch.dtype | None = None,
        base_key: str = "",
    ) -> None:
        if mode not in CACHE_MODES:
            raise FeatureCacheError(f"vision feature cache mode must be one of {CACHE_MODES}, got {mode!r}")
        if mode == "disk" and directory is None:
            raise FeatureCacheError("module.perf.vision_cache_dir must be set when cache_vision_features is 'disk'")
        self.mode = mode
        self.directory = None if directory is None else Path(directory)
        self.dtype = dtype
        self.base_key = base_key
        self.namespaces: dict[str, str] = {}  # stage -> namespace (set from the data module)
        self._memory: dict[tuple[str, int], _Entry] = {}
        self._positions: dict[tuple[Any, ...], Tensor] = {}
        self.hits = 0
        self.misses = 0

    def set_namespace(self, stage: str, namespace: str) -> None:
        self.namespaces[stage] = namespace

    def _namespace(self, stage: str) -> str:
        name = self.namespaces.get(stage, stage)
        if self.mode == "disk":
            name = hashlib.sha1(f"{self.base_key}|{name}|{self.dtype}".encode()).hexdigest()[:16]
        return name

    def __len__(self) -> int:
        if self.mode == "memory":
            return len(self._memory)
        return sum(1 for _ in self.directory.glob("*/*.pt")) if self.directory and self.directory.is_dir() else 0

    def nbytes(self) -> int:
        """Bytes held in memory (disk mode: 0)."""
        return sum(t.numel() * t.element_size() for entry in self._memory.values() for t in entry.levels)

    # ------------------------------------------------------------------------------------------ storage
    def _path(self, namespace: str, image_id: int) -> Path:
        assert self.directory is not None
        return self.directory / namespace / f"{image_id}.pt"

    def _load(self, namespace: str, image_id: int) -> _Entry | None:
        if self.mode == "memory":
            return self._memory.get((namespace, image_id))
        path = self._path(namespace, image_id)
        if not path.is_file():
            return None
        entry = torch.load(path, map_location="cpu", weights_only=True)
        return _Entry(entry["fingerprint"], tuple(entry["levels"]), getattr(torch, entry["dtype"]))

    def _store(self, namespace: str, image_id: int, entry: _Entry) -> None:
        if self.mode == "memory":
            self._memory[(namespace, image_id)] = entry
            return
        path = self._path(namespace, image_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        dtype = str(entry.dtype).removeprefix("torch.")
        torch.save({"fingerprint": entry.fingerprint, "levels": list(entry.levels), "dtype": dtype}, tmp)
        os.replace(tmp, path)  # readers never see a half-written entry

    # ------------------------------------------------------------------------------------------ lookup
    def _positions_for(self, neck: nn.Module, level: Tensor) -> Tensor:
        key = (tuple(level.shape[1:]), level.dtype, level.device)
        if key not in self._positions:
            shape = torch.Size((1, *level.shape[1:]))
            self._positions[key] = neck.position_encoding(shape, level.device, level.dtype)
        return self._positions[key]

    def features(
        self, model: nn.Module, pixel_values: Tensor, image_ids: Sequence[int] | Tensor, stage: str
    ) -> Sam3VisionEncoderOutput:
        """Vision features of the I images: cached ones loaded, the others computed (no grad) and stored.

        Args:
            model: the Sam3Model (or a PEFT model around it) whose ``get_vision_features`` computes misses.
            pixel_values: float (I, 3, S, S).
            image_ids: the I image ids (an id seen twice must have the same pixels).
            stage: ``train`` or ``val`` (selects the namespace: data root, split and transforms).

        Returns:
            ``Sam3VisionEncoderOutput`` with ``fpn_hidden_states`` / ``fpn_position_encoding``: tuples of
            (I, C, h, w) per level, on ``pixel_values.device``, in the dtype they were computed in.
        """
        ids = [int(i) for i in (image_ids.tolist() if isinstance(image_ids, Tensor) else image_ids)]
        if not ids:
            return model.get_vision_features(pixel_values=pixel_values)
        namespace = self._namespace(stage)
        prints = pixel_fingerprints(pixel_values)
        entries: dict[int, _Entry] = {}
        first_miss: dict[int, int] = {}  # image id -> its first row in the batch
        for k, image_id in enumerate(ids):
            entry = entries.get(image_id) or self._load(namespace, image_id)
            if entry is None:
                first_miss.setdefault(image_id, k)
                self.misses += 1
                continue
            if not torch.allclose(entry.fingerprint, prints[k], rtol=1e-9, atol=1e-6):
                raise FeatureCacheError(
                    f"vision feature cache: the pixels of image {image_id} ({stage}) changed since its features were "
                    "cached: the transforms are random or the dataset changed. Turn module.perf.cache_vision_features "
                    "off, use deterministic transforms, or delete module.perf.vision_cache_dir"
                )
            entries[image_id] = entry
            self.hits += 1
        computed: dict[int, tuple[Tensor, ...]] = {}
        if first_miss:
            rows = list(first_miss.values())
            with torch.no_grad():
                out = model.get_vision_features(pixel_values=pixel_values[rows])
            for j, (image_id, k) in enumerate(first_miss.items()):
                levels = tuple(level[j].detach() for level in out.fpn_hidden_states)
                computed[image_id] = levels
                stored = tuple(t.to("cpu", self.dtype or t.dtype).clone() for t in levels)
                self._store(namespace, image_id, _Entry(prints[k], stored, levels[0].dtype))
        device = pixel_values.device
        per_image = [
            computed[i] if i in computed else tuple(t.to(device, entries[i].dtype) for t in entries[i].levels)
            for i in ids
        ]
        stacked = tuple(torch.stack([levels[n] for levels in per_image]) for n in range(len(per_image[0])))
        neck = unwrap_base(model).vision_encoder.neck
        positions = tuple(self._positions_for(neck, level).expand(level.shape[0], -1, -1, -1) for level in stacked)
        return Sam3VisionEncoderOutput(fpn_hidden_states=stacked, fpn_position_encoding=positions)


# ----------------------------------------------------------------------------------------------- text


class TextFeatureCache:
    """Output of a frozen text encoder (``last_hidden_state``, (T, D) per prompt) per distinct prompt.

    Entries stay on the device they were computed on; a cache holds one entry per distinct prompt of the data
    (categories x phrasings), so its size is bounded by the vocabulary of prompts, not the dataset. Prompts are
    keyed by their text, which the batch carries on the host (``Sam3Batch.prompts``): no device read per step.
    """

    def __init__(self) -> None:
        self._store: dict[str, Tensor] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._store)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._store.values())

    def __call__(self, text_encoder: nn.Module, input_ids: Tensor, attention_mask: Tensor,
                 texts: Sequence[str]) -> Tensor:
        """(R, T) ids and mask -> (R, T, D) ``last_hidden_state``, computing each distinct prompt at most once.

        ``texts``: the R prompt texts the ids were tokenized from (host strings, the cache keys).
        """
        if len(texts) != input_ids.shape[0]:
            raise ValueError(f"text cache: {len(texts)} texts for {input_ids.shape[0]} rows of token ids")
        keys = list(texts)
        missing: dict[str, int] = {}
        for r, key in enumerate(keys):
            if key not in self._store and key not in missing:
                missing[key] = r
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            index = list(missing.values())
            with torch.no_grad():
                hidden = text_encoder(
                    input_ids=input_ids[index], attention_mask=attention_mask[index], return_dict=True
                ).last_hidden_state
            for j, key in enumerate(missing):
                self._store[key] = hidden[j].detach()
        return torch.stack([self._store[key] for key in keys])
