"""Adapter identity: the hand-over format (a PEFT directory + sidecar) and the checks of training checkpoints.

A saved adapter directory holds ``adapter_config.json`` + ``adapter_model.safetensors`` (plain
``peft.PeftModel.from_pretrained(base, dir)`` restores it with no sam3lora code) and ``sam3lora.json`` (base
identity: name, architecture hash, weight hash; the LoRA settings). ``load_adapter`` checks that adapter and base
agree before loading and that every tensor of the file ended up in the model, so a mismatch is an error instead
of a model that silently loaded nothing.

A Lightning checkpoint (``.ckpt``, for resuming) is Lightning's own: the trainable weights only (keys
``model.<peft name>``), the module's hyperparameters (``save_hyperparameters``: plain settings, among them
``lora_settings``, read back by ``recorded_lora``) and ``checkpoint["sam3lora"] = {"base": base_fingerprint,
"trainable": names}`` (``checkpoint_record``). ``Sam3LoRAModule.on_load_checkpoint`` runs ``check_checkpoint`` both
in a resume and in ``Sam3LoRAModule.load_from_checkpoint``, which is how the predictor reads a ``.ckpt``;
``check_base`` is the one base check of adapter directories and checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file
from torch import nn

from sam3lora.errors import Sam3LoRAError
from sam3lora.fingerprint import base_fingerprint, peft_free_name, portable_fingerprint
from sam3lora.io import atomic_dir
from sam3lora.lora import LoraSettings, unwrap_base
from sam3lora.model_card import write_adapter_card

SIDECAR = "sam3lora.json"
CHECKPOINT_KEY = "sam3lora"  # the checkpoint entry written by ``checkpoint_record``
HPARAMS_KEY = LightningModule.CHECKPOINT_HYPER_PARAMS_KEY  # where Lightning keeps ``save_hyperparameters``' values
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


class AdapterLoadError(Sam3LoRAError, ValueError):
    """An adapter (PEFT directory or sam3lora checkpoint) is missing, unreadable, malformed or incomplete."""


class AdapterMismatchError(AdapterLoadError):
    """The adapter does not fit the base model it is being loaded into."""


def check_base(model: nn.Module, recorded: Mapping[str, Any], source: str | Path, check_weights: bool = True,
               hint: str = "") -> None:
    """Raise ``AdapterMismatchError`` (naming ``source``) if ``recorded`` (a ``base_fingerprint``) is not ``model``'s
    base: architecture, and with ``check_weights`` the weights; a value recorded on one side only is not compared."""
    here = base_fingerprint(model)
    trained_on, this = f"trained on base {recorded.get('name_or_path')!r}", f"this base {here['name_or_path']!r}"
    architecture = (recorded.get("architecture"), here["architecture"])
    if None not in architecture and architecture[0] != architecture[1]:
        raise AdapterMismatchError(
            f"{source}: {trained_on} (architecture {architecture[0]}), but {this} has architecture "
            f"{architecture[1]}: load it onto the base it was trained on"
        )
    weights = (recorded.get("weights"), here["weights"])
    if check_weights and None not in weights and weights[0] != weights[1]:
        raise AdapterMismatchError(
            f"{source}: {trained_on} (weights {weights[0]}), but {this} has other base weights (weights "
            f"{weights[1]}): load it onto the base it was trained on{hint}"
        )


def checkpoint_record(model: nn.Module, trainable: Iterable[str]) -> dict[str, Any]:
    """The ``checkpoint["sam3lora"]`` entry of a training checkpoint: ``model``'s base fingerprint and the names of
    the ``trainable`` weights it holds (a manifest), plain types only (``torch.load(weights_only=True)`` reads it)."""
    return {"base": base_fingerprint(model), "trainable": sorted(trainable)}


def recorded_lora(checkpoint: Mapping[str, Any], source: str | Path) -> LoraSettings:
    """The LoRA settings a sam3lora checkpoint records (the module's ``lora_settings`` hyperparameter).

    Raises ``AdapterLoadError`` naming ``source`` when they are absent or invalid.
    """
    lora = (checkpoint.get(HPARAMS_KEY) or {}).get("lora_settings")
    if not isinstance(lora, Mapping):
        raise AdapterLoadError(
            f"{source}: checkpoint records no LoRA settings (hyperparameter 'lora_settings' is empty), so its "
            "adapters cannot be rebuilt; use the run's adapter directory (<run>/adapter) instead"
        )
    try:
        return LoraSettings(**dict(lora))
    except (TypeError, ValueError) as err:
        raise AdapterLoadError(f"{source}: recorded LoRA settings are invalid: {err}") from None


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a sam3lora Lightning checkpoint (tensors and plain types only, ``weights_only=True``) on the CPU.

    Raises ``AdapterLoadError`` naming ``path`` for an unreadable file, a file that is not a Lightning checkpoint
    or one without the ``sam3lora`` entry.
    """
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and torch errors: report them all as "not a readable checkpoint"
        raise AdapterLoadError(f"{path}: not a readable PyTorch checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(checkpoint, Mapping) or "state_dict" not in checkpoint:
        raise AdapterLoadError(f"{path}: not a Lightning checkpoint (no 'state_dict')")
    checkpoint_info(checkpoint, path)
    return dict(checkpoint)


def checkpoint_info(checkpoint: Mapping[str, Any], source: str | Path) -> Mapping[str, Any]:
    """``checkpoint["sam3lora"]`` (see ``checkpoint_record``); ``AdapterLoadError`` when there is none."""
    info = checkpoint.get(CHECKPOINT_KEY)
    if not isinstance(info, Mapping) or not isinstance(info.get("base"), Mapping):
        raise AdapterLoadError(f"{source}: checkpoint was not written by sam3lora (no 'sam3lora' entry): cannot "
                               "verify it")
    return info


def check_checkpoint(model: nn.Module, checkpoint: Mapping[str, Any], expected: set[str], source: str | Path) -> None:
    """Refuse a checkpoint made on another base than ``model``'s or whose ``state_dict`` keys are not exactly
    ``expected`` (the trainable weights it must restore): ``AdapterLoadError`` / ``AdapterMismatchError``."""
    check_base(model, checkpoint_info(checkpoint, source)["base"], source)
    saved = set(checkpoint["state_dict"])
    missing = sorted(expected - saved)
    if missing:
        raise AdapterMismatchError(
            f"{source}: lacks {len(missing)} trainable weight(s) of this model, e.g. {missing[:3]}: it is incomplete "
            "or was made with another LoRA preset"
        )
    extra = sorted(saved - expected)  # Lightning loads with strict_loading off: they would be dropped without a word
    if extra:
        raise AdapterMismatchError(
            f"{source}: holds {len(extra)} weight(s) this model does not train, e.g. {extra[:3]}: it was made with "
            "another LoRA preset"
        )


def save_adapter(
    model: PeftModel, out_dir: str | Path, settings: Any = None, overwrite: bool = True, run: Any = None
) -> Path:
    """Save the adapter in PEFT format, the ``sam3lora.json`` sidecar and a model card (``README.md``, see
    ``sam3lora.model_card``; ``run``: the run's facts, ``model_card.run_facts``); the directory is written whole.
    No file records an absolute path: the base is named by its hub id, preset or folder name."""
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        sidecar: dict[str, Any] = {"base": portable_fingerprint(base_fingerprint(model))}
        if settings is not None:
            sidecar["lora"] = dataclasses.asdict(settings) if dataclasses.is_dataclass(settings) else settings
        if run is not None:
            sidecar["run"] = run
        (tmp / SIDECAR).write_text(json.dumps(sidecar, indent=2, default=str))
        write_adapter_card(tmp, model, sidecar, ref=out_dir)  # README.md; adapter_config.json's base made portable
    return Path(out_dir)


def read_adapter_facts(adapter: str | Path) -> dict[str, Any]:
    """``base``, ``lora`` and ``run`` facts of an adapter directory (its ``sam3lora.json``) or a sam3lora
    Lightning checkpoint (its ``sam3lora`` entry: no run facts); {} when there are none."""
    path = Path(adapter)
    if path.is_dir():
        sidecar = path / SIDECAR
        return json.loads(sidecar.read_text()) if sidecar.is_file() else {}
    if path.is_file():
        checkpoint = read_checkpoint(path)
        info = checkpoint.get(CHECKPOINT_KEY) or {}
        return {"base": portable_fingerprint(info.get("base") or {}),
                "lora": (checkpoint.get(HPARAMS_KEY) or {}).get("lora_settings")}
    return {}


def check_adapter(model: nn.Module, adapter_dir: str | Path, check_weights: bool = True) -> dict[str, Any]:
    """Raise ``AdapterMismatchError`` naming the problem if the adapter cannot fit ``model``; return the sidecar.

    Checks: the PEFT files exist; the recorded base architecture (and, with ``check_weights``, the base weights)
    equal this model's; every adapter tensor targets an existing Linear module with matching shapes.
    """
    path = Path(adapter_dir)
    for name in ADAPTER_FILES:
        if not (path / name).is_file():
            raise AdapterMismatchError(f"{path}: missing {name} (not a PEFT adapter directory)")
    sidecar: dict[str, Any] = {}
    if (path / SIDECAR).is_file():
        sidecar = json.loads((path / SIDECAR).read_text())
        check_base(model, sidecar.get("base", {}), path, check_weights, hint=" (check_weights=False loads it anyway)")
    modules = dict(unwrap_base(model).named_modules())
    problems = []
    config = _read_adapter_config(path / "adapter_config.json")
    for key, tensor in read_adapter_weights(path).items():
        if ".lora_A." not in key and ".lora_B." not in key:
            continue
        module_name = peft_free_name(key.removeprefix("base_model.model.").split(".lora_")[0])
        rank = _configured_rank(config, module_name)
        actual_rank = tensor.shape[0] if ".lora_A." in key else tensor.shape[-1]
        if rank is not None and actual_rank != rank:
            raise AdapterMismatchError(
                f"{path / 'adapter_config.json'}: says rank {rank} for {module_name}, but "
                f"adapter_model.safetensors holds rank {actual_rank} ({key}): the two files do not belong together"
            )
        module = modules.get(module_name)
        base_layer = getattr(module, "base_layer", module)
        if not isinstance(base_layer, nn.Linear):
            problems.append(f"{module_name}: no such Linear module in the base model")
            continue
        expected_dim = base_layer.in_features if ".lora_A." in key else base_layer.out_features
        actual_dim = tensor.shape[1] if ".lora_A." in key else tensor.shape[0]
        if actual_dim != expected_dim:
            problems.append(f"{key}: shape {tuple(tensor.shape)} does not fit {module_name} ({expected_dim})")
    if problems:
        listed = "; ".join(problems[:5]) + (f"; ... ({len(problems)} in all)" if len(problems) > 5 else "")
        raise AdapterMismatchError(f"{path}: adapter does not fit this base model: {listed}")
    return sidecar


def read_adapter_weights(adapter_dir: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of ``adapter_model.safetensors``; a truncated or corrupt file is an error naming it."""
    file = Path(adapter_dir) / "adapter_model.safetensors"
    try:
        return load_file(file)
    except Exception as err:  # safetensors raises SafetensorError (not an OSError) on a truncated header or body
        raise AdapterMismatchError(f"{file}: cannot read the adapter weights, the file is truncated or corrupt "
                                   f"({' '.join(str(err).split())})") from None


def _read_adapter_config(file: Path) -> dict[str, Any]:
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AdapterMismatchError(f"{file}: cannot read the adapter config ({err})") from None
    if not isinstance(config, dict):
        raise AdapterMismatchError(f"{file}: the adapter config must be a JSON object")
    return config


def _configured_rank(config: dict[str, Any], module_name: str) -> int | None:
    """The LoRA rank ``adapter_config.json`` gives ``module_name`` (PEFT's ``rank_pattern``, else ``r``)."""
    for pattern, rank in (config.get("rank_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module_name):
            return int(rank)
    rank = config.get("r")
    return int(rank) if isinstance(rank, int | float) else None


def load_adapter(
    model: nn.Module,
    adapter_dir: str | Path,
    adapter_name: str = "default",
    is_trainable: bool = False,
    check_weights: bool = True,
) -> PeftModel:
    """Check, then load a PEFT adapter onto ``model`` (a base model or a ``PeftModel`` to add it to).

    After loading, every tensor of ``adapter_model.safetensors`` is compared with the model's; any that did not
    arrive raises ``AdapterMismatchError``.
    """
    path = Path(adapter_dir)
    check_adapter(model, path, check_weights=check_weights)
    if isinstance(model, PeftModel):
        model.load_adapter(str(path), adapter_name=adapter_name, is_trainable=is_trainable)
        peft_model = model
    else:
        peft_model = PeftModel.from_pretrained(model, str(path), adapter_name=adapter_name, is_trainable=is_trainable)
    in_model = get_peft_model_state_dict(peft_model, adapter_name=adapter_name)  # keys as PEFT saves them
    missing = []
    for key, tensor in read_adapter_weights(path).items():
        param = in_model.get(key)
        if param is None or not torch.equal(param.detach().cpu().to(tensor.dtype), tensor):
            missing.append(key)
    if missing:
        raise AdapterMismatchError(
            f"{path}: {len(missing)} adapter tensor(s) did not load into the model, e.g. {missing[:3]}"
        )
    return peft_model
