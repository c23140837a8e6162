"""What ``make demo`` serves by default: the newest training run's adapter and the base it was trained on."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

RUNS_DIR = Path("logs/train/runs")  # where `make train` writes <timestamp>/adapter (conf/paths)


@dataclass(frozen=True)
class BaseInfo:
    """A base as ``Sam3LoRAPredictor.from_pretrained`` takes it: ``name`` (``tiny`` | hub id | dir) and the tiny
    preset ``seed``; ``source`` says where it was read."""

    name: str
    seed: int = 0
    source: str = ""


def newest_adapter(runs: str | Path = RUNS_DIR) -> Path | None:
    """``<run>/adapter`` most recently written under ``runs`` (a PEFT directory with ``adapter_config.json``)."""
    root = Path(runs)
    if not root.is_dir():
        return None
    found = [d / "adapter" for d in root.iterdir() if (d / "adapter" / "adapter_config.json").is_file()]
    return max(found, key=lambda p: ((p / "adapter_config.json").stat().st_mtime, p.parent.name), default=None)


def preset_of(name_or_path: str, seed: int = 0, source: str = "") -> BaseInfo:
    """A recorded base name -> what loads it: ``.../tiny-seed<N>`` (a materialised tiny preset) -> ``tiny`` with
    seed N, ``.../tiny-pretrained`` -> ``tiny-pretrained``; anything else unchanged."""
    leaf = Path(name_or_path).name
    match = re.fullmatch(r"tiny-seed(\d+)", leaf)
    if match:
        return BaseInfo("tiny", int(match.group(1)), source)
    if leaf == "tiny-pretrained" and not Path(name_or_path).is_dir():
        return BaseInfo("tiny-pretrained", 0, source)
    return BaseInfo(name_or_path, seed, source)


def _run_config(run: Path, group: str = "model") -> dict[str, Any] | None:
    """The ``group`` section of ``<run>/.hydra/config.yaml`` (as saved: interpolations unresolved), or None."""
    cfg = run / ".hydra" / "config.yaml"
    if not cfg.is_file():
        return None
    try:
        data = yaml.safe_load(cfg.read_text())
    except (OSError, yaml.YAMLError):
        return None
    section = data.get(group) if isinstance(data, dict) else None
    return section if isinstance(section, dict) else None


def _run_of(adapter: str | Path) -> Path:
    path = Path(adapter)
    return path.parent if path.is_dir() else path.parent.parent


def synthetic_categories_of(adapter: str | Path) -> list[str] | None:
    """The synthetic categories the run of ``adapter`` generated its data with (``data.synthetic.categories``),
    or None (not a synthetic run, or the generator's defaults)."""
    data = _run_config(_run_of(adapter), "data") or {}
    synthetic = data.get("synthetic")
    names = synthetic.get("categories") if isinstance(synthetic, dict) else None
    return [str(n) for n in names] if isinstance(names, list) and names else None


def _recorded_base(adapter: Path) -> str | None:
    """The base name an adapter directory's sidecar or a checkpoint's ``sam3lora`` entry records."""
    try:
        if adapter.is_dir():
            info = json.loads((adapter / "sam3lora.json").read_text()).get("base", {})
        else:
            from sam3lora.adapter import read_checkpoint

            info = read_checkpoint(adapter)["sam3lora"]["base"]
    except (OSError, ValueError, KeyError, AttributeError):
        return None
    name = info.get("name_or_path") if isinstance(info, dict) else None
    return name if isinstance(name, str) and name else None


def base_of(adapter: str | Path) -> BaseInfo | None:
    """The base ``adapter`` (``<run>/adapter`` or ``<run>/checkpoints/*.ckpt``) was trained on, or None.

    First the run's Hydra config (``<run>/.hydra/config.yaml``: ``model.name_or_path`` and ``model.seed``), then
    the adapter's own record (``sam3lora.json`` sidecar or the checkpoint's ``sam3lora.base``).
    """
    path = Path(adapter)
    run = _run_of(path)
    model = _run_config(run)
    if model and isinstance(model.get("name_or_path"), str) and "${" not in model["name_or_path"]:
        seed = model.get("seed", 0)
        return preset_of(model["name_or_path"], seed if isinstance(seed, int) else 0, f"{run}/.hydra/config.yaml")
    recorded = _recorded_base(path)
    return preset_of(recorded, source=str(path)) if recorded else None
