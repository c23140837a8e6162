"""Build the model a predictor runs: a base (``tiny``, hub id or local directory) plus zero, one or several adapters.

An adapter is a PEFT directory written by ``sam3lora.adapter.save_adapter`` (or any PEFT LoRA directory), or a
Lightning checkpoint written by ``Sam3LoRAModule`` (``.ckpt``: trainable weights only, keys ``model.<peft name>``,
plus ``checkpoint["sam3lora"] = {"base", "trainable", "lora"}``). Every path checks that the adapter was made for
this base and that every adapter tensor arrived in the model; a mismatch raises instead of silently loading
nothing.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, get_peft_model
from torch import nn
from transformers import Sam3Processor

from sam3lora.adapter import AdapterMismatchError, base_fingerprint, load_adapter
from sam3lora.inference.errors import AdapterLoadError, PredictorError
from sam3lora.lora import LoraSettings, adapted_modules, lora_config, plan, unwrap_base
from sam3lora.model import load_model, meta_model
from sam3lora.model.loading import canonical_dtype as model_dtype

_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
# PEFT parameter names carry the adapter name right after one of these module names.
_ADAPTER_SLOT = re.compile(
    r"\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector|modules_to_save)\.([^.]+)(?=\.|$)"
)


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


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Load a sam3lora Lightning checkpoint (tensors only, ``weights_only=True``) and check its shape."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and torch errors: report them all as "not a readable checkpoint"
        raise AdapterLoadError(f"{path}: not a readable PyTorch checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(ckpt, Mapping) or "state_dict" not in ckpt:
        raise AdapterLoadError(f"{path}: not a Lightning checkpoint (no 'state_dict')")
    info = ckpt.get("sam3lora")
    if not isinstance(info, Mapping) or not isinstance(info.get("base"), Mapping):
        raise AdapterLoadError(f"{path}: checkpoint was not written by sam3lora (no 'sam3lora' entry)")
    if not isinstance(info.get("lora"), Mapping):
        raise AdapterLoadError(
            f"{path}: checkpoint records no LoRA settings ('sam3lora.lora' is empty), so its adapters cannot be "
            "rebuilt; use the run's adapter directory (<run>/adapter) instead"
        )
    return dict(ckpt)


def check_base(path: Path, recorded: Mapping[str, Any], model: nn.Module) -> None:
    """Raise ``AdapterMismatchError`` if ``recorded`` (a base fingerprint) is not ``model``'s base."""
    here = base_fingerprint(model)
    for key in ("architecture", "weights"):
        if None not in (recorded.get(key), here[key]) and recorded[key] != here[key]:
            raise AdapterMismatchError(
                f"{path}: made for base {recorded.get('name_or_path')!r} ({key} {recorded[key]}), but this base "
                f"is {here['name_or_path']!r} ({key} {here[key]}): load it onto the base it was trained on"
            )


def _adapter_keys(state: Mapping[str, Any], name: str) -> set[str]:
    return {k for k in state if any(m.group(2) == name for m in _ADAPTER_SLOT.finditer(k))}


def load_checkpoint_adapter(model: nn.Module, path: str | Path, name: str = "default") -> PeftModel:
    """Rebuild the adapters of a sam3lora Lightning checkpoint on ``model`` (a base or a ``PeftModel``) as ``name``.

    Steps: check the base fingerprint; build the LoRA layout from ``checkpoint["sam3lora"]["lora"]``; load the
    trainable weights (keys ``model.<peft name>``, renamed to ``name``); verify that every trainable key the
    checkpoint lists is present and that every adapter weight of the rebuilt model was loaded.
    """
    path = Path(path)
    _check_name(name)
    ckpt = read_checkpoint(path)
    info = ckpt["sam3lora"]
    check_base(path, info["base"], model)
    try:
        settings = LoraSettings(**dict(info["lora"]))
    except (TypeError, ValueError) as err:
        raise AdapterLoadError(f"{path}: recorded LoRA settings are invalid: {err}") from None
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    listed = [k.removeprefix("model.") for k in info.get("trainable", [])]
    absent = [k for k in listed if k not in state]
    if absent:
        raise AdapterLoadError(
            f"{path}: checkpoint lists {len(absent)} trainable weight(s) it lacks, e.g. {absent[:3]}"
        )
    saved_names = {m.group(2) for k in state for m in _ADAPTER_SLOT.finditer(k)}
    if len(saved_names) != 1:
        raise AdapterLoadError(
            f"{path}: expected the weights of one adapter, found adapter names {sorted(saved_names)}"
        )
    (saved,) = saved_names

    def rename(key: str) -> str:
        return _ADAPTER_SLOT.sub(lambda m: f".{m.group(1)}.{name}" if m.group(2) == saved else m.group(0), key)

    state = {rename(k): v for k, v in state.items()}
    # the layout is planned on plain Linear layers: a model that already holds adapters is planned on its
    # architecture rebuilt on the meta device (no memory)
    layout = meta_model(unwrap_base(model).config) if isinstance(model, PeftModel) else model
    config = lora_config(layout, settings)
    intended = {n for names in plan(layout, settings).values() for n in names}
    if isinstance(model, PeftModel):
        model.add_adapter(name, config)
        peft_model = model
    else:
        peft_model = get_peft_model(model, config, adapter_name=name)
    adapted = {n for n in adapted_modules(peft_model) if name in peft_model.get_base_model().get_submodule(n).lora_A}
    if adapted != intended:
        raise AdapterLoadError(
            f"{path}: PEFT adapted {len(adapted)} modules, the recorded settings intend {len(intended)}"
        )
    result = peft_model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise AdapterMismatchError(
            f"{path}: {len(result.unexpected_keys)} checkpoint weight(s) fit no module of this model, e.g. "
            f"{result.unexpected_keys[:3]}: made with another LoRA preset or model"
        )
    expected = _adapter_keys(peft_model.state_dict(), name)
    missing = sorted(expected - set(state))
    if missing:
        raise AdapterMismatchError(
            f"{path}: checkpoint lacks {len(missing)} adapter weight(s) of its own LoRA settings, e.g. {missing[:3]}"
        )
    return peft_model


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
    dtype: str = "float32",
    merge: bool = True,
    seed: int = 0,
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
            read_checkpoint(Path(source))  # a broken checkpoint fails here, not after loading the base
    model, processor = load_model(base, dtype=canonical_dtype(dtype), seed=seed, image_size=image_size)
    if not sources:
        return LoadedModel(model.eval(), processor)
    for name, source in sources.items():
        model = attach_adapter(model, source, name)
    names = list(sources)
    if merge and len(names) == 1:
        model.set_adapter(names[0])
        return LoadedModel(model.merge_and_unload().eval(), processor, names, merged=names[0])
    return LoadedModel(model.eval(), processor, names)
