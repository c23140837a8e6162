"""Load SAM 3 (hub id, local directory or the offline ``tiny`` preset) as ``(Sam3Model, Sam3Processor)``."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
from transformers import Sam3Config, Sam3Model, Sam3Processor

from sam3lora.errors import Sam3LoRAError
from sam3lora.model.tiny import PRETRAINED_DIR, materialise_tiny

HUB_ID = "facebook/sam3"
#: dtype names accepted by every sam3lora option that takes one
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: short names some command-line options also accept
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def canonical_dtype(dtype: str, key: str = "dtype") -> str:
    """``fp32 | bf16 | fp16`` or a name of :data:`DTYPES` -> that name; anything else is an error naming ``key``."""
    name = DTYPE_ALIASES.get(dtype, dtype)
    if name not in DTYPES:
        raise ValueError(f"{key} must be one of {sorted(DTYPES) + sorted(DTYPE_ALIASES)}, got {dtype!r}")
    return name


class ModelLoadError(Sam3LoRAError, RuntimeError):
    """The base model could not be loaded; the message says why and what to do."""


def resolve(name_or_path: str, seed: int) -> str:
    """Map a preset name to what ``from_pretrained`` takes: ``tiny`` / ``tiny-pretrained`` -> a local directory,
    ``sam3`` -> the hub id; anything else is passed through."""
    if name_or_path == "tiny":
        return str(materialise_tiny(seed))
    if name_or_path == "tiny-pretrained":
        if not (PRETRAINED_DIR / "config.json").is_file():
            raise ModelLoadError(
                f"{PRETRAINED_DIR} is missing: make it with `python scripts/pretrain_tiny.py --state DIR` and package "
                "the best weights with `--weights DIR/best.safetensors --out` (docs/training.md)"
            )
        return str(PRETRAINED_DIR)
    if name_or_path == "sam3":
        return HUB_ID
    return name_or_path


def load_model(
    name_or_path: str,
    *,
    image_size: int | None = None,
    dtype: str,
    seed: int,
    token: str | None = None,
) -> tuple[Sam3Model, Sam3Processor]:
    """Return ``(model, processor)`` from a hub id, a local directory or the ``tiny`` preset.

    The keys of ``conf/model/*.yaml`` are its arguments and have no defaults here (the YAML states them):
    ``load_model(**cfg.model)``, or e.g. ``load_model("tiny", dtype="float32", seed=0)``.

    Args:
        name_or_path: ``facebook/sam3`` (or ``sam3``), a local transformers directory, or ``tiny``.
        image_size: if given, must equal the model's input size (catches a data config made for another model).
        dtype: ``float32 | bfloat16 | float16`` for the base weights.
        seed: weight seed of the ``tiny`` preset (ignored otherwise).
        token: Hugging Face token; defaults to ``$HF_TOKEN`` (the real weights are gated).
    """
    if dtype not in DTYPES:
        raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    source = resolve(name_or_path, seed)
    token = token or os.environ.get("HF_TOKEN")
    local_only = hub_access(source)
    try:
        model = Sam3Model.from_pretrained(source, dtype=DTYPES[dtype], token=token, local_files_only=local_only)
        processor = Sam3Processor.from_pretrained(source, token=token, local_files_only=local_only)
    except OSError as err:  # gated repo, no network, missing files: transformers raises OSError subclasses
        raise ModelLoadError(_explain(source, err)) from err
    if image_size is not None and model.config.image_size != image_size:
        raise ValueError(
            f"model.image_size={image_size} but {name_or_path} takes {model.config.image_size} px images; "
            "set model.image_size to the model's size"
        )
    return model.eval(), processor


_HELP = (
    "SAM 3's weights are gated: accept the licence at https://huggingface.co/facebook/sam3, create a token "
    "(https://huggingface.co/settings/tokens) and export HF_TOKEN=... (or run `hf auth login`). Offline, "
    "point model.name_or_path at a local copy (a directory made by save_pretrained), or use model=tiny."
)


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def _explain(source: str, err: Exception) -> str:
    if Path(source).exists():
        return f"could not load SAM 3 from the local directory {source}: {_one_line(err)}"
    return f"could not load {source!r} from the Hugging Face hub. {_HELP} (cause: {_one_line(err)})"


def _offline() -> bool:
    flags = (os.environ.get(k, "").strip().lower() for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return any(f in ("1", "true", "yes", "on") for f in flags)


def _cached(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # not a valid repo id: from_pretrained says what is wrong
        return False


def _hub_reachable(timeout: float = 3.0) -> bool:
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def hub_access(source: str) -> bool:
    """For a hub id: whether to load from the local cache only (offline, or the hub unreachable but the files
    cached). Fails at once, with the help first, when the files can come from nowhere: offline or unreachable
    and not cached (instead of a minute of connection retries and a long traceback)."""
    if Path(source).exists() or source.count("/") != 1:
        return False
    if _offline():
        if _cached(source):
            return True
        raise ModelLoadError(f"could not load {source!r}: offline (HF_HUB_OFFLINE) and not in the local Hugging Face "
                             f"cache. {_HELP}")
    if _hub_reachable():
        return False
    if _cached(source):
        return True
    raise ModelLoadError(f"could not load {source!r}: cannot reach the Hugging Face hub and it is not in the local "
                         f"cache. {_HELP}")


def meta_model(config: Sam3Config | None = None) -> Sam3Model:
    """The architecture without memory (meta device): the released SAM 3 when ``config`` is None."""
    with torch.device("meta"):
        return Sam3Model(config or Sam3Config())
