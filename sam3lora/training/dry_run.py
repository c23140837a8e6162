"""``dry_run=true``: build the architecture on the meta device, apply LoRA, report parameters, train nothing."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table
from transformers import Sam3Config

from sam3lora.io import write_whole
from sam3lora.lora import LoraSettings, apply_lora, parameter_report, plan
from sam3lora.model import HUB_ID, meta_model, resolve


def architecture(name_or_path: str, seed: int) -> Sam3Config:
    """The model's config without weights: the released SAM 3 for the hub id (no download), else the local one."""
    source = resolve(name_or_path, seed)
    if source == HUB_ID:
        return Sam3Config()
    if not Path(source).is_dir():
        raise FileNotFoundError(f"model.name_or_path={name_or_path!r}: no such local directory")
    return Sam3Config.from_pretrained(source)


def lora_summary(name_or_path: str, settings: LoraSettings, seed: int) -> dict:
    """Per-component total / trainable parameters of ``name_or_path`` with ``settings`` (meta device)."""
    base = meta_model(architecture(name_or_path, seed))
    planned = plan(base, settings)
    rows = parameter_report(apply_lora(base, settings))
    total = rows[-1]
    return {
        "model": name_or_path,
        "components": rows,
        "adapted_modules": {c: len(names) for c, names in planned.items()},
        "trainable_percent": 100.0 * int(total["trainable"]) / int(total["total"]),
    }


def print_summary(summary: dict, console: Console | None = None) -> None:
    table = Table(title=f"LoRA parameters: {summary['model']}")
    for col in ("component", "total", "trainable", "trainable %", "adapted modules"):
        table.add_column(col, justify="left" if col == "component" else "right")
    for row in summary["components"]:
        pct = 100.0 * int(row["trainable"]) / max(int(row["total"]), 1)
        n = summary["adapted_modules"].get(row["component"], "")
        table.add_row(row["component"], f"{row['total']:,}", f"{row['trainable']:,}", f"{pct:.3f}", str(n))
    (console or Console()).print(table)


def dry_run(name_or_path: str, settings: LoraSettings, out_dir: str | Path, seed: int) -> dict:
    """Print the parameter table and write ``lora_summary.json`` into ``out_dir``."""
    summary = lora_summary(name_or_path, settings, seed)
    print_summary(summary)
    write_whole(Path(out_dir) / "lora_summary.json", json.dumps(summary, indent=2))
    return summary
