"""Build the model a predictor runs: a base (``tiny``, hub id or local directory) plus zero, one or several adapters.

An adapter is a PEFT directory written by ``sam3lora.adapter.save_adapter`` (or any PEFT LoRA directory), or a
Lightning checkpoint written by ``Sam3LoRAModule`` (``.ckpt``, see ``sam3lora.adapter``), which goes through the
checks a resume runs. Every path checks that the adapter was made for this base and that every adapter tensor
arrived in the model; a mismatch raises instead of silently loading nothing.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from peft import PeftModel
from torch import nn
from transformers import Sam3Processor

from sam3lora.adapter import (
    AdapterLoadError,
    check_base,
    checkpoint_info,
    load_adapter,
    read_checkpoint,
    recorded_lora,
)
from sam3lora.config import defaults
from sam3lora.inference.errors import PredictorError
from sam3lora.lora import apply_lora
from sam3lora.model import load_model
from sam3lora.model.load_base import canonical_dtype as model_dtype
from sam3lora.model.materialised_masks import materialise_attention_masks
from sam3lora.training.module import SOURCE_KWARG, Sam3LoRAModule

_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass
class LoadedModel:
    """What a predictor runs: ``model`` (``Sam3Model``, or a ``PeftModel`` holding ``adapters``), its processor,
    and, when a single adapter was merged into the weights, its name in ``merged``."""

    model: nn.Module
    processor: Sam3Processor
    adapters: list[str] = field(default_factory=list)
    merged: str | None = None


def canonical_dtype(dtype: str) -> str:
    """``fp32 | bf16 | fp16`` (or the long torch names) -> ``float32 | bfloat16 | float16``."""
    try:
        return model_dtype(dtype)
    except ValueError as err:
        raise PredictorError(str(err)) from None


def adapter_name_for(path: str | Path, taken: set[str]) -> str:
    """A short unique name for an adapter path: its folder name (or checkpoint stem), made unique with its parent."""
    p = Path(path)
    name = p.stem if p.suffix == ".ckpt" else p.name
    if name in ("adapter", "checkpoints", "last", "") or name in taken:
        name = f"{p.parent.name}-{name}" if p.parent.name else name
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-") or "adapter"
    base, i = name, 2
    while name in taken:
        name, i = f"{base}-{i}", i + 1
    return name


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME.match(name):
        raise PredictorError(f"adapter name {name!r} must be letters, digits, '_' or '-'")


def load_checkpoint_adapter(model: nn.Module, path: str | Path, name: str = "default") -> PeftModel:
    """Load the adapter of a sam3lora Lightning checkpoint onto ``model`` (a base or a ``PeftModel``) as ``name``.

    The checkpoint's recorded LoRA settings build the adapter layout (``apply_lora``, as training built it); then
    ``Sam3LoRAModule.load_from_checkpoint`` restores it, through the checks a resume runs (the base, and weights
    exactly the adapter's). The module is discarded and its loss hooks removed; the returned model has ``name`` active.
    """
    path = Path(path)
    _check_name(name)
    checkpoint = read_checkpoint(path)
    settings = recorded_lora(checkpoint, path)
    check_base(model, checkpoint_info(checkpoint, path)["base"], path)  # before the model is changed
    peft_model = apply_lora(model, settings, adapter_name=name)
    peft_model.set_adapter(name)  # trainable: the weights the checkpoint restores, as in training
    module = Sam3LoRAModule.load_from_checkpoint(
        path, map_location="cpu", weights_only=True, model=peft_model, criterion=None, optimizer=None,
        perf=defaults("module/default.perf"), **{SOURCE_KWARG: str(path)},
    )
    return module.unhook().requires_grad_(False)


def attach_adapter(model: nn.Module, source: str | Path, name: str) -> PeftModel:
    """Load a PEFT adapter directory or a sam3lora ``.ckpt`` onto ``model`` as adapter ``name``."""
    _check_name(name)
    path = Path(source)
    if path.is_dir():
        return load_adapter(model, path, adapter_name=name)
    if path.is_file():
        return load_checkpoint_adapter(model, path, name)
    raise AdapterLoadError(f"{path}: no such adapter directory or checkpoint file")


def load_for_inference(
    base: str,
    adapter: str | Path | Mapping[str, str | Path] | None = None,
    *,
    dtype: str,
    merge: bool = True,
    seed: int,
    image_size: int | None = None,
) -> LoadedModel:
    """Load the base once and attach the adapter(s).

    Args:
        base: ``tiny`` | hub id | local transformers directory.
        adapter: None, one adapter (directory or ``.ckpt``; its name is ``default``) or ``{name: path}``.
        dtype: ``float32 | bfloat16 | float16`` (or ``fp32 | bf16 | fp16``).
        merge: merge a single adapter into the weights (the base alone is then no longer available).
        seed / image_size: passed to ``sam3lora.model.load_model``.
    """
    sources = {} if adapter is None else dict(adapter) if isinstance(adapter, Mapping) else {"default": adapter}
    for name, source in sources.items():  # fail before the (long) base load
        _check_name(name)
        if not Path(source).exists():
            raise AdapterLoadError(f"{source}: no such adapter directory or checkpoint file")
        if Path(source).is_file():
            recorded_lora(read_checkpoint(source), Path(source))  # fails here, not after loading the base
    model, processor = load_model(base, dtype=canonical_dtype(dtype), seed=seed, image_size=image_size)
    materialise_attention_masks(model)  # no host read per attention mask, as in training (model.materialised_masks)
    if not sources:
        return LoadedModel(model.eval(), processor)
    for name, source in sources.items():
        model = attach_adapter(model, source, name)
    names = list(sources)
    if merge and len(names) == 1:
        model.set_adapter(names[0])
        return LoadedModel(model.merge_and_unload().eval(), processor, names, merged=names[0])
    return LoadedModel(model.eval(), processor, names)
