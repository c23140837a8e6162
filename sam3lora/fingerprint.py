"""Who a base model is: its fingerprint (name, architecture hash, weights hash) and names fit to share.

``base_fingerprint`` is what adapters (``sam3lora.json``) and training checkpoints record and what
``sam3lora.adapter.check_base`` compares; the portable names keep machine paths out of every shared file
(a hub id stays as is, a local directory becomes its folder name).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sam3lora.lora import unwrap_base

_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "dtype", "torch_dtype", "architectures"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def peft_free_name(name: str) -> str:
    """A parameter or module name without PEFT's ``.base_layer`` wrapper."""
    return name.replace(".base_layer", "")


ADAPTER_SLOT = re.compile(
    r"\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector|modules_to_save)\.([^.]+)(?=\.|$)"
)
"""Where a PEFT parameter name carries its adapter's name: group 1 the PEFT module kind, group 2 the adapter name."""


def adapter_names(names: Iterable[str]) -> set[str]:
    """The adapter names that PEFT parameter ``names`` carry (see ``ADAPTER_SLOT``)."""
    return {m.group(2) for name in names for m in ADAPTER_SLOT.finditer(name)}


def rename_adapter(names: Iterable[str], old: str, new: str) -> dict[str, str]:
    """``{name: the same name with adapter ``old`` renamed to ``new``}`` for PEFT parameter ``names``."""
    return {
        name: ADAPTER_SLOT.sub(lambda m: f".{m.group(1)}.{new}" if m.group(2) == old else m.group(0), name)
        for name in names
    }


def architecture_hash(config_dict: dict[str, Any]) -> str:
    """A short hash of a model config, without the keys that vary between saves of the same architecture."""

    def clean(d: Any) -> Any:
        if isinstance(d, dict):
            return {k: clean(v) for k, v in sorted(d.items()) if k not in _VOLATILE_CONFIG_KEYS}
        return d

    return hashlib.sha256(json.dumps(clean(config_dict), sort_keys=True, default=str).encode()).hexdigest()[:16]


def base_fingerprint(model: nn.Module, n_tensors: int = 4, n_values: int = 4096) -> dict[str, str | None]:
    """Identity of the base model: its name, an architecture hash and a hash of a few frozen base weights.

    The weight hash rounds to bfloat16 so the same base loaded in another dtype matches; it is None on the meta
    device (no values to hash).
    """
    base = unwrap_base(model)
    digest = hashlib.sha256()
    taken = 0
    weights_hash: str | None = None
    for name, param in base.named_parameters():
        if "lora_" in name or "modules_to_save" in name or "original_module" in name:
            continue
        if param.device.type == "meta":
            break
        digest.update(peft_free_name(name).encode())
        digest.update(param.detach().flatten()[:n_values].to(torch.bfloat16).view(torch.int16).cpu().numpy())
        taken += 1
        if taken == n_tensors:
            weights_hash = digest.hexdigest()[:16]
            break
    config = base.config
    return {
        "name_or_path": getattr(config, "_name_or_path", None) or None,
        "architecture": architecture_hash(config.to_dict()),
        "weights": weights_hash,
    }


def is_hub_id(name: str | None) -> bool:
    """True for ``owner/name`` that is not an existing local path."""
    return bool(name) and bool(_HUB_ID.match(str(name))) and not Path(str(name)).exists()


def portable_path(path: str | Path, workdir: str | Path | None = None) -> str:
    """``path`` relative to ``workdir`` (default: the current directory) when inside it, else its last component:
    what a shared file may say about a local path."""
    p = Path(path).absolute()
    here = Path(workdir or Path.cwd()).absolute()
    try:
        rel = p.relative_to(here)
    except ValueError:
        return p.name
    return rel.as_posix() or "."


def portable_base_name(name_or_path: str | None) -> str | None:
    """A base's recorded name without machine paths: a hub id as is; ``.../tiny-seed<N>`` -> ``tiny-seed<N>``,
    ``.../tiny-pretrained`` -> ``tiny-pretrained`` (sam3lora presets); another local directory -> its name."""
    if not name_or_path:
        return None
    name = str(name_or_path)
    if is_hub_id(name):
        return name
    if not Path(name).is_absolute() and not Path(name).exists() and "/" not in name:
        return name  # already a bare name (a preset)
    return Path(name).name


def portable_fingerprint(fingerprint: Mapping[str, Any]) -> dict[str, Any]:
    """``base_fingerprint`` output with ``name_or_path`` made portable (see ``portable_base_name``)."""
    out = dict(fingerprint)
    out["name_or_path"] = portable_base_name(out.get("name_or_path"))
    return out
