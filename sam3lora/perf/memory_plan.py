"""``module.perf.activation_checkpointing: auto``: the cheapest set of checkpointed components that fits.

The estimate comes from a measured table, not a guess: ``memory_table.json`` (next to this file) holds, per LoRA
preset, the bytes autograd saves for backward per image and component with checkpointing off and on
(``sam3lora.perf.saved_bytes``), and each component's forward FLOPs per image (what checkpointing it costs: one
more forward in backward). ``scripts/benchmark.py memory ... --memory-table PATH`` writes it from a run with
``--activation-checkpointing off,all``.

Scaling to another batch: the vision encoder's bytes scale with images x (S / S0)^2, the text encoder's with
the batch's distinct prompt texts (it runs once per distinct text, ``Sam3Batch.text_rows``), everything else
(per-row heads, glue, loss) with rows x (S / S0)^2; bytes scale with the compute dtype's size against the
table's. The peak of a step is larger than what it saves (temporaries, gradients of the activations): the
activations are multiplied by ``PEAK_FACTOR``, calibrated on the H200 (``docs/performance.md``: the measured
step memory at 1008 px, bf16, batch 1-8 was 1.04-1.29x this estimate from the 336 px fp32 table).
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sam3lora.errors import Sam3LoRAError
from sam3lora.perf.checkpointing import AUTO as AUTO  # re-exported: the value that asks for a plan
from sam3lora.perf.checkpointing import CHECKPOINTABLE

TABLE = Path(__file__).with_name("memory_table.json")
#: step memory / estimated saved bytes: 1.04-1.29 measured on the H200 (1008 px, bf16, every preset, batch 1-8)
PEAK_FACTOR = 1.3
#: share of the free memory kept in reserve (allocator fragmentation, CUDA context growth)
RESERVE = 0.1
#: bytes of optimiser-side state per trainable parameter: float32 gradient + AdamW's two moments
TRAINABLE_STATE_BYTES = 12


class MemoryPlanError(Sam3LoRAError):
    """The memory table is missing, malformed, or has no row for the model's preset."""


@dataclass(frozen=True)
class MemoryTable:
    """Saved bytes per image at ``image_size`` px, ``prompts`` rows per image, ``dtype`` compute, per preset.

    ``presets[preset]`` = ``{"plain": {part: bytes}, "checkpointed": {part: bytes}, "forward_flops": {part: flops}}``
    where ``part`` is a component of ``CHECKPOINTABLE``, ``other`` or ``loss``.
    """

    image_size: int
    prompts: int
    dtype: str
    presets: dict[str, dict[str, dict[str, float]]]
    source: str = ""

    @classmethod
    def load(cls, path: str | Path | None = None) -> MemoryTable:
        """The table at ``path`` (default: the shipped ``memory_table.json``)."""
        path = TABLE if path is None else path
        try:
            data = json.loads(Path(path).read_text())
            table = cls(int(data["image_size"]), int(data["prompts"]), str(data["dtype"]), dict(data["presets"]),
                        str(data.get("source", "")))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise MemoryPlanError(f"{path}: not a memory table ({err})") from None
        for preset, row in table.presets.items():
            missing = {"plain", "checkpointed", "forward_flops"} - set(row)
            if missing:
                raise MemoryPlanError(f"{path}: preset {preset!r} lacks {sorted(missing)}")
        return table

    def as_dict(self) -> dict[str, Any]:
        return {"image_size": self.image_size, "prompts": self.prompts, "dtype": self.dtype,
                "source": self.source, "presets": self.presets}


def preset_of(model: nn.Module) -> str:
    """The table row for a model: ``full`` when the text encoder trains, ``balanced`` when the vision encoder does
    (gradients flow through it), else ``minimal`` (the shipped presets; a custom one maps to the nearest)."""
    trains = {name.split(".")[0] for name, p in _base_named_parameters(model) if p.requires_grad}
    if "text_encoder" in trains:
        return "full"
    return "balanced" if "vision_encoder" in trains else "minimal"


def _base_named_parameters(model: nn.Module) -> Iterable[tuple[str, nn.Parameter]]:
    from sam3lora.lora import unwrap_base

    return unwrap_base(model).named_parameters()


@dataclass(frozen=True)
class Plan:
    """The chosen components, the estimated step memory (bytes) and budget, and the recompute cost (FLOPs)."""

    components: tuple[str, ...]
    estimate: float
    budget: float
    cost_flops: float
    fits: bool

    def describe(self) -> str:
        chosen = ", ".join(self.components) if self.components else "nothing"
        verdict = "fits" if self.fits else "does NOT fit even with every component checkpointed"
        return (f"activation_checkpointing auto: {chosen} (estimated {self.estimate / 1e9:.1f} GB of "
                f"{self.budget / 1e9:.1f} GB: {verdict}; +{self.cost_flops / 1e12:.2f} TFLOP recomputed per step)")


def _scales(table: MemoryTable, images: int, rows: int, texts: int | None, image_size: int) -> dict[str, float]:
    """Per-image multipliers of the table's figures: ``vision`` (size), ``text`` (distinct texts; the table's
    rows were distinct texts), ``row`` (rows and size, everything else)."""
    area = (image_size / table.image_size) ** 2
    per_text = (rows if texts is None else texts) / (images * table.prompts)  # the table: ``prompts`` rows per image
    return {"vision": area, "text": per_text, "row": rows / (images * table.prompts) * area}


def _scale(scales: dict[str, float], part: str) -> float:
    return scales["vision" if part == "vision_encoder" else "text" if part == "text_encoder" else "row"]


def estimate_bytes(table: MemoryTable, preset: str, components: Iterable[str], images: int, rows: int,
                   image_size: int, dtype: torch.dtype, texts: int | None = None) -> float:
    """Saved-for-backward bytes of one step of ``images`` images / ``rows`` rows / ``texts`` distinct prompt texts
    (None: one per row) with ``components`` checkpointed."""
    row = _row(table, preset)
    chosen = set(components)
    scales = _scales(table, images, rows, texts, image_size)
    width = torch.finfo(dtype).bits / torch.finfo(_dtype(table.dtype)).bits
    total = 0.0
    for part in {**row["plain"], **row["checkpointed"]}:
        plain, ckpt = row["plain"].get(part, 0.0), row["checkpointed"].get(part, 0.0)
        # glue and loss: the larger of their two measurements (they are not checkpointed)
        saved = (ckpt if part in chosen else plain) if part in CHECKPOINTABLE else max(plain, ckpt)
        total += saved * images * _scale(scales, part)
    return total * width


def _dtype(name: str) -> torch.dtype:
    from sam3lora.model.load_base import DTYPES

    return DTYPES[name]


def _row(table: MemoryTable, preset: str) -> dict[str, dict[str, float]]:
    if preset not in table.presets:
        raise MemoryPlanError(f"memory table ({table.source or TABLE.name}) has no row for preset {preset!r}; "
                              f"known: {sorted(table.presets)}")
    return table.presets[preset]


def choose(table: MemoryTable, preset: str, budget: float, images: int, rows: int, image_size: int,
           dtype: torch.dtype, fixed: float = 0.0, texts: int | None = None) -> Plan:
    """The set of ``CHECKPOINTABLE`` components with the least recompute FLOPs whose estimated step memory
    (``fixed`` + ``PEAK_FACTOR`` x saved bytes) fits ``budget``; every component when nothing fits.
    ``texts``: the batch's distinct prompt texts (None: one per row)."""
    row = _row(table, preset)
    flops = row["forward_flops"]
    scales = _scales(table, images, rows, texts, image_size)
    # only components whose checkpointing saves something are worth a recompute
    useful = [c for c in CHECKPOINTABLE if row["checkpointed"].get(c, 0.0) < row["plain"].get(c, 0.0)]

    def plan(subset: tuple[str, ...]) -> Plan:
        need = fixed + PEAK_FACTOR * estimate_bytes(table, preset, subset, images, rows, image_size, dtype, texts)
        cost = sum(flops.get(c, 0.0) * images * _scale(scales, c) for c in subset)
        return Plan(subset, need, budget, cost, need <= budget)

    plans = [plan(s) for n in range(len(useful) + 1) for s in itertools.combinations(useful, n)]
    best = min((p for p in plans if p.fits), key=lambda p: p.cost_flops, default=None)
    if best is None:
        best = plan(tuple(useful))
    return best


def free_memory(device: torch.device) -> float:
    """Bytes free on ``device``: CUDA's ``mem_get_info``, else the host's available memory."""
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[0])
    with open("/proc/meminfo") as f:  # MemAvailable counts reclaimable caches, unlike SC_AVPHYS_PAGES
        for line in f:
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def plan_for(model: nn.Module, images: int, rows: int, image_size: int, dtype: torch.dtype, device: torch.device,
             budget_gb: float | None = None, table: MemoryTable | None = None, texts: int | None = None) -> Plan:
    """:func:`choose` for ``model`` on ``device``: its preset, ``budget_gb`` or the device's free memory less
    ``RESERVE``, minus the trainable parameters' gradient and optimiser state (not allocated yet)."""
    table = table or MemoryTable.load()
    budget = budget_gb * 1e9 if budget_gb is not None else free_memory(device) * (1 - RESERVE)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return choose(table, preset_of(model), budget, images, rows, image_size, dtype,
                  fixed=trainable * TRAINABLE_STATE_BYTES, texts=texts)


def table_from_records(records: Iterable[dict[str, Any]], image_size: int, source: str) -> MemoryTable:
    """A :class:`MemoryTable` from ``scripts/benchmark.py memory`` records (``--activation-checkpointing off,all``,
    one image size, one prompt count); records of another compute dtype than the first one's are left out, and
    a later record of the same preset and checkpointing replaces an earlier one. The text encoder's bytes and
    FLOPs are scaled to one distinct text per row (a record's ``texts``: the distinct prompts its step encoded;
    records without it encoded one per row)."""
    presets: dict[str, dict[str, dict[str, float]]] = {}
    shape: set[tuple[int, str]] = set()
    first: str | None = None
    for r in records:
        ckpt = r["ckpt"]
        if r.get("status") != "ok" or (ckpt is not False and ckpt != list(CHECKPOINTABLE)):
            continue
        dtype = r["base_dtype"] if r["precision"] == "fp32" else "bfloat16"
        first = first or dtype
        if dtype != first:
            continue
        shape.add((int(r["prompts"]), dtype))
        row = presets.setdefault(r["preset"], {"plain": {}, "checkpointed": {}, "forward_flops": {}})
        per_text = r["rows"] / r.get("texts", r["rows"])
        row["plain" if ckpt is False else "checkpointed"] = _per_row_text(r["saved_gb_per_image_by_component"],
                                                                         per_text, 1e9)
        if r.get("forward_flops_per_image"):
            row["forward_flops"] = _per_row_text(r["forward_flops_per_image"], per_text)
    # a run without FLOP counts takes another preset's: a component's forward FLOPs hardly depend on the preset
    # (the adapters add r / width of the adapted layers' FLOPs)
    counted = next((row["forward_flops"] for row in presets.values() if row["forward_flops"]), None)
    for row in presets.values():
        if not row["forward_flops"] and counted is not None:
            row["forward_flops"] = dict(counted)
    incomplete = [p for p, row in presets.items() if not (row["plain"] and row["checkpointed"] and
                                                          row["forward_flops"])]
    if len(shape) != 1 or incomplete or not presets:
        raise MemoryPlanError("--memory-table needs one prompt count and compute dtype, for every preset the "
                              "checkpointing off and all rows, and FLOP counts (--flops on) in one of them "
                              f"(got {sorted(shape)}, incomplete: {incomplete})")
    (prompts, dtype), = shape
    return MemoryTable(image_size, prompts, dtype, presets, source)


def _per_row_text(values: dict[str, float], per_text: float, unit: float = 1.0) -> dict[str, float]:
    """A record's per-component figures times ``unit``, the text encoder's times ``per_text`` (rows / texts)."""
    return {k: v * unit * (per_text if k == "text_encoder" else 1.0) for k, v in values.items()}


def checkpoint_for_batch(model: nn.Module, batch: Any, budget_gb: float | None,
                         base_dtype: torch.dtype | None = None, table: MemoryTable | None = None) -> Plan:
    """Resolve ``activation_checkpointing: auto`` on the first training batch (a ``Sam3Batch``): plan for its
    images, rows, distinct prompt texts and size in the compute dtype (autocast's, else ``base_dtype``, else
    float32) on its device, and switch checkpointing on for the chosen components."""
    from sam3lora.perf.checkpointing import set_activation_checkpointing

    device = batch.pixel_values.device
    if torch.is_autocast_enabled(device.type):
        dtype = torch.get_autocast_dtype(device.type)
    else:
        dtype = base_dtype or torch.float32
    texts = None if batch.text_rows is None else len(batch.text_rows)
    plan = plan_for(model, batch.num_images, batch.num_rows, int(batch.pixel_values.shape[-1]), dtype, device,
                    budget_gb, table, texts)
    if plan.components:
        set_activation_checkpointing(model, plan.components)
    return plan


def gpu_table(gpu_gb: Iterable[float], image_size: int, prompts: int, dtype: torch.dtype, base_gb: float,
              max_batch: int = 8, table: MemoryTable | None = None) -> list[dict[str, Any]]:
    """Per GPU size and preset: the largest batch up to ``max_batch`` that fits and what auto checkpoints for it,
    and the largest batch that fits at all (everything checkpointed). ``base_gb``: memory in use before the first
    step (weights, CUDA context); the trainable state is left out (megabytes for LoRA)."""
    table = table or MemoryTable.load()
    rows = []
    for gb in gpu_gb:
        budget = (gb - base_gb) * 1e9 * (1 - RESERVE)
        for preset in table.presets:
            plans = {}
            for batch in itertools.count(1):
                plan = choose(table, preset, budget, batch, batch * prompts, image_size, dtype)
                if not plan.fits or batch > 4096:
                    break
                plans[batch] = plan
            chosen = max((b for b in plans if b <= max_batch), default=0)
            plan = plans.get(chosen)
            rows.append({"gpu_gb": gb, "preset": preset, "batch": chosen, "largest_batch": max(plans, default=0),
                         "components": list(plan.components) if plan else None,
                         "estimate_gb": plan.estimate / 1e9 + base_gb if plan else None,
                         "recompute_tflop_per_image": plan.cost_flops / chosen / 1e12 if plan else None})
    return rows


def main(argv: list[str] | None = None) -> None:
    """``python -m sam3lora.perf.memory_plan``: the "which settings for my GPU" table from the shipped table."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--gpu-gb", default="12,24,48,80", help="GPU memory sizes, comma-separated")
    parser.add_argument("--image-size", type=int, default=1008)
    parser.add_argument("--prompts", type=int, default=4, help="rows per image")
    parser.add_argument("--dtype", default="bfloat16", help="compute dtype (bf16-mixed: bfloat16)")
    parser.add_argument("--max-batch", type=int, default=8, help="the batch to plan for when it fits")
    parser.add_argument("--base-gb", type=float, default=4.2,
                        help="in use before the first step (H200, float32 base: weights, adapters, CUDA context)")
    args = parser.parse_args(argv)
    rows = gpu_table([float(g) for g in args.gpu_gb.split(",")], args.image_size, args.prompts,
                     _dtype(args.dtype), args.base_gb, args.max_batch)
    print("| GPU GB | preset | batch | auto checkpoints | estimated peak GB | recompute TFLOP/img | largest batch |")
    print("| ---: | --- | ---: | --- | ---: | ---: | ---: |")
    for r in rows:
        if not r["batch"]:
            print(f"| {r['gpu_gb']:g} | {r['preset']} | 0 | does not fit | - | - | 0 |")
            continue
        ckpt = ", ".join(r["components"]) or "nothing"
        print(f"| {r['gpu_gb']:g} | {r['preset']} | {r['batch']} | {ckpt} | {r['estimate_gb']:.1f} | "
              f"{r['recompute_tflop_per_image']:.2f} | {r['largest_batch']} |")


if __name__ == "__main__":
    main()
