"""Model cards: the ``README.md`` of every adapter and merged export, in the Hugging Face format.

A card is YAML metadata (``base_model`` only when the base came from the hub, ``library_name``, ``pipeline_tag``,
``license``, ``tags``) followed by prose built from facts:

- the base (``sam3lora.fingerprint.base_fingerprint``, with a portable name: a hub id, a sam3lora preset, or a local
  directory's name; never an absolute path of the training machine);
- the LoRA layout per component (rank, alpha, targets, layers, adapted layers, parameters), read from the model;
- the run (``run_facts``): data, training settings and the evaluation table. Adapters keep these facts in their
  ``sam3lora.json`` under ``run``, so a card can be rewritten later (``training.callbacks.finish_run_cards``
  after ``fit``, when the start-vs-best numbers are known) and a merged export carries the same card;
- how to use it: ``sam3lora-predict`` / ``Sam3LoRAPredictor``, and plain transformers + PEFT with the source of
  ``sam3lora.sam3`` (the SAM 3 contract) embedded, so the snippet reproduces our predictions with no sam3lora code.

``docs/adapters.md`` describes the conventions.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from sam3lora.fingerprint import (
    ADAPTER_SLOT,
    architecture_hash,
    base_fingerprint,
    is_hub_id,
    portable_base_name,
    portable_fingerprint,
    portable_path,
)
from sam3lora.io import write_whole

CARD = "README.md"
SAM3_HUB_ID = "facebook/sam3"
SAM_LICENSE = {
    "license": "other",
    "license_name": "sam-license",
    "license_link": "https://github.com/facebookresearch/sam3/blob/main/LICENSE",
}
PIPELINE_TAG = "image-segmentation"
TAGS = ["sam3", "lora", "peft", "sam3lora", "image-segmentation", "instance-segmentation", "open-vocabulary"]
#: validation metrics listed first in the evaluation table (the rest follow sorted)
FIRST_METRICS = ("val/iou", "val/dice", "val/cgF1", "val/IL_MCC", "val/pmF1", "val/segm_AP", "val/bbox_AP", "val/loss")
MAX_CATEGORY_ROWS = 100
PLAIN_TRANSFORMERS_NOTE = (
    "transformers' own `Sam3Processor(images=..., text=...)` + `post_process_instance_segmentation` gives other "
    "detections than this model was trained and evaluated with: (1) for a text-only prompt the processor sends no "
    "box, so the geometry encoder is skipped; sam3lora (like Meta's official model) always sends one padding box "
    "(label -10) whose CLS token the geometry encoder appends to the prompt; (2) it upsamples mask probabilities, "
    "while Meta's post-processor (and sam3lora) upsamples mask logits and then thresholds; (3) it keeps scores "
    "`> threshold` in query order and does not clamp boxes to the image (sam3lora: `>= threshold`, best first, "
    "clamped). The functions above are what `sam3lora-predict` runs."
)


# --------------------------------------------------------------------------------------------------- paths
def _base_kind(name: str | None) -> str:
    if name is None:
        return "unknown"
    if re.fullmatch(r"tiny-seed\d+", name) or name in ("tiny", "tiny-pretrained"):
        return "preset"
    return "hub" if is_hub_id(name) else "local"


# --------------------------------------------------------------------------------------------------- facts
def _settings_dict(settings: Any) -> dict[str, Any] | None:
    if settings is None:
        return None
    if dataclasses.is_dataclass(settings) and not isinstance(settings, type):
        return dataclasses.asdict(settings)
    return dict(settings)


def lora_facts(model: nn.Module, settings: Any = None, adapter_name: str | None = None) -> dict[str, Any]:
    """Per-component LoRA layout of ``model`` (a ``PeftModel``): settings, adapted layers and parameter counts.

    Parameters are counted by name (``lora_A/B``, DoRA magnitudes, ``modules_to_save`` copies of ``adapter_name``,
    default: the active adapter), so frozen inference models count like training ones.
    """
    from sam3lora.lora import COMPONENTS, component_of

    name = adapter_name or getattr(model, "active_adapter", None) or "default"
    if isinstance(name, (list, tuple)):
        name = name[0]
    per_component: dict[str, dict[str, int]] = {}
    base_params = 0
    for pname, param in model.named_parameters():
        slot = ADAPTER_SLOT.search(pname)
        if slot is None:
            if "original_module" not in pname and ".modules_to_save." not in pname:
                base_params += param.numel()
            continue
        if slot.group(2) != name:
            continue
        row = per_component.setdefault(component_of(pname), {"parameters": 0, "layers": 0})
        row["parameters"] += param.numel()
    for mname, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if lora_a is not None and name in lora_a:
            component = component_of(mname)
            per_component.setdefault(component, {"parameters": 0, "layers": 0})["layers"] += 1
    config = _settings_dict(settings) or {}
    rows = []
    for component in [c for c in COMPONENTS if c in per_component] + sorted(set(per_component) - set(COMPONENTS)):
        comp = config.get(component) if isinstance(config.get(component), Mapping) else {}
        is_lora = component in COMPONENTS and bool(comp.get("enabled", per_component[component]["layers"] > 0))
        rows.append({
            "component": component,
            "kind": "lora" if is_lora else "trained in full (modules_to_save)",
            "rank": (comp.get("rank") or config.get("rank")) if is_lora else None,
            "alpha": (comp.get("alpha") or config.get("alpha")) if is_lora else None,
            "targets": (comp.get("targets") or config.get("targets")) if is_lora else None,
            "layers": comp.get("layers") if is_lora else None,
            "adapted_layers": per_component[component]["layers"],
            "parameters": per_component[component]["parameters"],
        })
    return {
        "settings": config or None,
        "components": rows,
        "adapter_parameters": sum(r["parameters"] for r in rows),
        "base_parameters": base_params,
    }


def _split_facts(dataset: Any, split: str) -> dict[str, Any]:
    reader = getattr(dataset, "reader", None)
    coco = getattr(reader, "coco", None)
    instances = None
    if coco is not None:
        instances = sum(1 for a in coco.dataset.get("annotations", []) if not a.get("iscrowd", 0))
    return {"split": split, "images": len(getattr(dataset, "records", [])), "instances": instances}


def _synthetic_facts(settings: Any) -> dict[str, Any] | None:
    """The generator settings of a synthetic set (counts, size, seed, categories), no paths."""
    if not isinstance(settings, Mapping):
        return None
    return {k: settings[k] for k in ("train", "val", "size", "seed", "categories", "hard_negatives") if k in settings}


def data_facts(datamodule: Any, workdir: str | Path | None = None) -> dict[str, Any] | None:
    """Dataset name, path relative to ``workdir``, categories and image/instance counts per split, from a
    ``Sam3DataModule`` after ``setup`` (None for another kind of data module)."""
    root = getattr(datamodule, "root", None)
    if root is None:
        return None
    splits = dict(getattr(datamodule, "splits", {}) or {})
    facts: dict[str, Any] = {
        "name": Path(root).name,
        "path": portable_path(root, workdir),
        "reader": None,
        "prompt_mode": getattr(getattr(datamodule, "settings", None), "mode", None),
        "synthetic": _synthetic_facts(getattr(datamodule, "synthetic", None)),
        "path_inside_workdir": Path(root).absolute().is_relative_to(Path(workdir or Path.cwd()).absolute()),
        "splits": [],
        "categories": [],
    }
    reader_cfg = getattr(datamodule, "reader", None)
    if isinstance(reader_cfg, Mapping):
        facts["reader"] = reader_cfg.get("_target_")
    for role in ("train", "val"):
        dataset = getattr(datamodule, f"{role}_dataset", None)
        if dataset is not None:
            facts["splits"].append({"role": role, **_split_facts(dataset, splits.get(role, role))})
    source = getattr(datamodule, "train_dataset", None) or getattr(datamodule, "val_dataset", None)
    if source is not None:
        coco = getattr(getattr(source, "reader", None), "coco", None)
        names = {int(k): v.get("name") for k, v in coco.cats.items()} if coco is not None else {}
        for cid, prompts in sorted(getattr(source, "prompts", {}).items()):
            facts["categories"].append({"id": int(cid), "name": names.get(int(cid)) or prompts[0], "prompts": prompts})
    return facts


def training_facts(trainer: Any) -> dict[str, Any]:
    """Epochs, steps, learning rates, schedule, precision, seed and batch of a Lightning ``trainer`` mid-fit."""
    optimizer = trainer.optimizers[0] if trainer.optimizers else None
    lrs: list[float] = []
    weight_decay = None
    if optimizer is not None:
        lrs = sorted({float(g.get("initial_lr", g["lr"])) for g in optimizer.param_groups})
        decays = sorted({float(g.get("weight_decay", 0.0)) for g in optimizer.param_groups})
        weight_decay = decays[-1] if decays else None
    module = trainer.lightning_module
    schedule = getattr(module, "schedule", None)
    datamodule = getattr(trainer, "datamodule", None)
    seed = os.environ.get("PL_GLOBAL_SEED")
    batch = getattr(datamodule, "batch_size", None)
    return {
        "max_epochs": trainer.max_epochs,
        "max_steps": trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None,
        "epoch": trainer.current_epoch,
        "global_step": trainer.global_step,
        "optimizer": type(optimizer).__name__ if optimizer is not None else None,
        "learning_rates": lrs,
        "weight_decay": weight_decay,
        "schedule": _settings_dict(schedule) if dataclasses.is_dataclass(schedule) else None,
        "precision": str(trainer.precision),
        "seed": int(seed) if seed is not None and seed.lstrip("-").isdigit() else None,
        "batch_size": batch,
        "accumulate_grad_batches": trainer.accumulate_grad_batches,
        "devices": trainer.world_size,
        "image_size": getattr(datamodule, "image_size", None),
    }


def val_metrics(values: Mapping[str, Any] | None) -> dict[str, float] | None:
    if values is None:
        return None
    return {k: float(v) for k, v in values.items() if str(k).startswith("val/")}


def run_facts(
    trainer: Any, record: Mapping[str, Any], mode: str = "max", workdir: str | Path | None = None
) -> dict[str, Any]:
    """Data, training and (interim) evaluation facts of a run during ``fit``: what ``BestAdapterExport`` records
    beside the adapter it saves. ``record``: ``monitor``, ``score``, ``epoch`` and ``global_step`` of that adapter.

    The validation metrics are the trainer's current ones when it stands at that epoch, else (an adapter restored
    on resume) the monitored score alone; ``finish_run_cards`` replaces them with the run's final numbers.
    """
    metrics = val_metrics(trainer.callback_metrics) or {}
    if record.get("epoch") != trainer.current_epoch or record.get("monitor") not in metrics:
        metrics = {str(record.get("monitor")): float(record.get("score", math.nan))}
    training = training_facts(trainer)
    training.update(epoch=record.get("epoch"), global_step=record.get("global_step"))
    return {
        "data": data_facts(getattr(trainer, "datamodule", None), workdir),
        "training": training,
        "evaluation": {
            "monitor": record.get("monitor"),
            "mode": mode,
            "epoch": record.get("epoch"),
            "global_step": record.get("global_step"),
            "start": None,
            "best": metrics,
            "final": False,
        },
    }


# --------------------------------------------------------------------------------------------------- writing
def adapter_card(model: nn.Module, sidecar: Mapping[str, Any], adapter_ref: str | None = None) -> str:
    """The card of an adapter directory whose ``sam3lora.json`` is ``sidecar`` (base, lora, run)."""
    facts = {
        "kind": "adapter",
        "base": dict(sidecar.get("base") or {}),
        "lora": lora_facts(model, sidecar.get("lora")),
        "run": sidecar.get("run"),
        "ref": adapter_ref,
    }
    return render(facts)


def write_adapter_card(directory: str | Path, model: nn.Module, sidecar: Mapping[str, Any], ref: str | Path) -> Path:
    """Write ``README.md`` into an adapter ``directory`` being saved (``sidecar``: what its ``sam3lora.json``
    holds; ``ref``: where the adapter will live) and name the base in PEFT's ``adapter_config.json`` by its hub id,
    preset or folder name instead of a path."""
    directory = Path(directory)
    config_path = directory / "adapter_config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text())
        if config.get("base_model_name_or_path"):
            config["base_model_name_or_path"] = portable_base_name(config["base_model_name_or_path"])
            write_whole(config_path, json.dumps(config, indent=2, sort_keys=True))
    plain_sidecar = json.loads(json.dumps(sidecar, default=str))
    return write_whole(directory / CARD, adapter_card(model, plain_sidecar, portable_path(ref)))


def merged_card_facts(
    model: nn.Module, adapter: str | Path | None, shared_as: str | Path, recorded: Mapping[str, Any]
) -> dict[str, Any]:
    """Facts of a merged export, from ``model`` (the ``PeftModel`` before merging) and the adapter's own files
    (``adapter``: its directory or sam3lora checkpoint, or None; ``recorded``: what
    ``sam3lora.adapter.read_adapter_facts`` read from it); ``shared_as``: where the export will live."""
    return {
        "kind": "merged",
        "base": portable_fingerprint(recorded.get("base") or base_fingerprint(model)),
        "lora": lora_facts(model, recorded.get("lora")),
        "run": recorded.get("run"),
        "adapter": portable_path(adapter) if adapter is not None else None,
        "ref": portable_path(shared_as),
    }


def write_merged_card(directory: str | Path, facts: Mapping[str, Any], merged: nn.Module, dtype: str) -> Path:
    """Write the ``README.md`` of a merged export into ``directory`` (``facts``: ``merged_card_facts``)."""
    full = {**facts, "dtype": dtype, "fingerprint": base_fingerprint(merged)}
    return write_whole(Path(directory) / CARD, render(json.loads(json.dumps(full, default=str))))


# --------------------------------------------------------------------------------------------------- render
def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.4f}" if abs(value) < 1e4 else f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value) if value else "-"
    return str(value)


def _cell(value: Any) -> str:
    return _fmt(value).replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _license(base: Mapping[str, Any]) -> tuple[dict[str, str], str]:
    """Licence metadata and sentence for a base: SAM 3's weights (hub id or the released architecture) carry the
    SAM License; sam3lora's tiny presets are Apache-2.0 (made by this project); anything else: the base's own."""
    name = base.get("name_or_path")
    released = False
    try:
        from transformers import Sam3Config

        released = base.get("architecture") == architecture_hash(Sam3Config().to_dict())
    except Exception:  # an older transformers without Sam3Config cannot tell; the name still can
        released = False
    if (name and str(name).startswith(SAM3_HUB_ID)) or released:
        return dict(SAM_LICENSE), (
            "Derived from Meta's SAM 3 weights: the [SAM License](" + SAM_LICENSE["license_link"] + ") applies to "
            "these weights and to their use."
        )
    if _base_kind(name) == "preset":
        return {"license": "apache-2.0"}, (
            "Apache-2.0: the base is a sam3lora preset (weights made by sam3lora, no Meta weights)."
        )
    return {"license": "other"}, "The licence of the base model applies; sam3lora adds no terms of its own."


def _base_display(base: Mapping[str, Any]) -> tuple[str, str, str]:
    """(markdown description, what ``--base`` / ``from_pretrained`` take, BASE of the plain snippet + comment)."""
    name = base.get("name_or_path")
    kind = _base_kind(name)
    if kind == "hub":
        return (f"[`{name}`](https://huggingface.co/{name}) (Hugging Face hub)", str(name), f'"{name}"')
    if name == "tiny-pretrained":
        return (
            "`tiny-pretrained`: sam3lora's shipped 1.66M-parameter SAM 3 (`sam3lora/assets/tiny-pretrained`, made by "
            "`scripts/pretrain_tiny.py`)",
            "tiny-pretrained",
            '"sam3lora/assets/tiny-pretrained"  # in a sam3lora checkout',
        )
    match = re.fullmatch(r"tiny-seed(\d+)", str(name))
    if match:
        seed = int(match.group(1))
        return (
            f"`tiny` (seed {seed}): sam3lora's offline random preset, built by "
            f"`sam3lora.model.materialise_tiny({seed})`",
            "tiny",
            f'"{name}"  # the folder printed by: python -c "from sam3lora.model import materialise_tiny; '
            f'print(materialise_tiny({seed}))"',
        )
    if kind == "local":
        return (
            f"a local transformers directory named `{name}` (not on the hub; the fingerprint below identifies it)",
            f"path/to/{name}",
            f'"path/to/{name}"  # the local base this was trained on',
        )
    return ("not recorded", SAM3_HUB_ID, f'"{SAM3_HUB_ID}"  # the base was not recorded: use the one it was trained on')


def plain_source() -> str:
    """The source of ``sam3lora.sam3`` without its module docstring (torch + transformers only)."""
    import sam3lora.sam3 as contract

    source = Path(contract.__file__).read_text()
    tree = ast.parse(source)
    first = tree.body[0]
    if isinstance(first, ast.Expr) and isinstance(getattr(first, "value", None), ast.Constant):
        source = "\n".join(source.splitlines()[first.end_lineno :])
    return source.strip() + "\n"


def _example_prompts(run: Mapping[str, Any] | None) -> list[str]:
    categories = ((run or {}).get("data") or {}).get("categories") or []
    prompts = [c["prompts"][0] if c.get("prompts") else c.get("name") for c in categories[:2]]
    return [p for p in prompts if p] or ["red circle"]


def snippet(facts: Mapping[str, Any]) -> str:
    """The plain transformers (+ PEFT) snippet of a card: the ``plain`` functions, then a short usage block with the
    assignments ``BASE``/``ADAPTER`` (or ``MODEL``), ``IMAGES``, ``PROMPTS``, ``THRESHOLD``, ``MASK_THRESHOLD``."""
    prompts = _example_prompts(facts.get("run"))
    prompt_list = "[" + ", ".join(f"({json.dumps(p)}, [])" for p in prompts) + "]"
    lines = ["# pip install torch transformers peft pillow", plain_source(), ""]
    if facts["kind"] == "adapter":
        _, _, base_ref = _base_display(facts["base"])
        adapter = facts.get("ref") or "adapter"
        lines += [
            "from peft import PeftModel",
            "from transformers import Sam3Model",
            "",
            f"BASE = {base_ref}",
            f"ADAPTER = {json.dumps(adapter)}  # this folder (or the hub repo you uploaded it to)",
        ]
    else:
        lines += [
            "from transformers import Sam3Model",
            "",
            f"MODEL = {json.dumps(facts.get('ref') or 'merged')}  # this folder (or the hub repo you uploaded it to)",
        ]
    lines += [
        'IMAGES = ["image.jpg"]',
        f"PROMPTS = {prompt_list}  # (text, exemplar boxes [[x1, y1, x2, y2], ...] in pixels)",
        "THRESHOLD = 0.5  # keep instances scoring >= this",
        "MASK_THRESHOLD = 0.5",
        "",
    ]
    if facts["kind"] == "adapter":
        lines += [
            "processor = Sam3Processor.from_pretrained(BASE)",
            "model = Sam3Model.from_pretrained(BASE, dtype=torch.float32)",
            "# merged, as sam3lora-predict merges a single adapter (same numbers); keep the PeftModel to switch",
            "model = PeftModel.from_pretrained(model, ADAPTER).merge_and_unload().eval()",
        ]
    else:
        lines += [
            "processor = Sam3Processor.from_pretrained(MODEL)",
            "model = Sam3Model.from_pretrained(MODEL, dtype=torch.float32).eval()",
        ]
    lines += [
        'images = [Image.open(path).convert("RGB") for path in IMAGES]',
        "results = sam3_predict(model, processor, images, PROMPTS, THRESHOLD, MASK_THRESHOLD)",
        "for path, per_prompt in zip(IMAGES, results):",
        "    for (text, _), found in zip(PROMPTS, per_prompt):",
        '        print(path, text, [round(float(s), 3) for s in found["scores"]])  # also found["masks"], ["boxes"]',
    ]
    return "\n".join(lines)


def _metadata(facts: Mapping[str, Any]) -> dict[str, Any]:
    base = facts["base"]
    meta: dict[str, Any] = {}
    name = base.get("name_or_path")
    if _base_kind(name) == "hub":
        meta["base_model"] = name
        meta["base_model_relation"] = "adapter" if facts["kind"] == "adapter" else "finetune"
    meta["library_name"] = "peft" if facts["kind"] == "adapter" else "transformers"
    meta["pipeline_tag"] = PIPELINE_TAG
    meta.update(_license(base)[0])
    meta["tags"] = list(TAGS) + (["merged-lora"] if facts["kind"] == "merged" else [])
    return meta


def _data_section(data: Mapping[str, Any] | None) -> list[str]:
    if not data:
        return ["Not recorded: this adapter was saved outside a sam3lora training run."]
    where = (
        f"at `{data['path']}` relative to the training run's working directory" if data.get("path_inside_workdir")
        else "a folder outside the training run's working directory"
    )
    out = [f"Dataset `{data['name']}` ({where})."]
    synthetic = data.get("synthetic")
    if synthetic:
        out[0] += (
            f" Generated by `sam3lora-data synthetic` (seed {synthetic.get('seed')}, {synthetic.get('size')} px): "
            "coloured shapes, one category per colour + shape."
        )
    if data.get("prompt_mode"):
        out[0] += f" Prompt mode `{data['prompt_mode']}` (`data.prompts.mode`: text, box or text+box exemplars)."
    out += ["", _table(["split", "folder", "images", "instances"], [
        [s["role"], s["split"], s["images"], s["instances"]] for s in data.get("splits", [])
    ])]
    categories = data.get("categories") or []
    if categories:
        shown = categories[:MAX_CATEGORY_ROWS]
        out += ["", f"{len(categories)} categories:", "", _table(["id", "name", "prompts"], [
            [c["id"], c["name"], c["prompts"]] for c in shown
        ])]
        if len(categories) > len(shown):
            out += ["", f"... and {len(categories) - len(shown)} more (all are listed in `sam3lora.json`)."]
    return out


def _training_section(training: Mapping[str, Any] | None, evaluation: Mapping[str, Any] | None) -> list[str]:
    if not training:
        return ["Not recorded: this adapter was saved outside a sam3lora training run."]
    epochs = training.get("epochs_trained")
    epochs_text = f"{epochs} of {training.get('max_epochs')}" if epochs is not None else (
        f"{training.get('max_epochs')} planned (card written during training, at epoch {training.get('epoch')})"
    )
    schedule = training.get("schedule") or {}
    schedule_text = (
        f"{schedule.get('name')}, {schedule.get('warmup_steps')} warm-up steps, final lr ratio "
        f"{schedule.get('min_lr_ratio')}" if schedule else None
    )
    batch = training.get("batch_size")
    effective = None
    if batch is not None:
        effective = batch * int(training.get("accumulate_grad_batches") or 1) * int(training.get("devices") or 1)
    rows = [
        ["epochs", epochs_text],
        ["optimiser steps", training.get("steps_trained", training.get("global_step"))],
        ["optimiser", training.get("optimizer")],
        ["peak learning rate" + ("s" if len(training.get("learning_rates") or []) > 1 else ""),
         [f"{lr:g}" for lr in training.get("learning_rates") or []]],
        ["weight decay", f"{training['weight_decay']:g}" if training.get("weight_decay") is not None else None],
        ["schedule", schedule_text],
        ["precision", training.get("precision")],
        ["seed", training.get("seed")],
        ["images per batch and device", batch],
        ["gradient accumulation", training.get("accumulate_grad_batches")],
        ["devices", training.get("devices")],
        ["effective batch (images)", effective],
        ["input size (px)", training.get("image_size")],
    ]
    out = [_table(["setting", "value"], rows)]
    if evaluation:
        out += ["", (
            f"The weights here are the best by `{evaluation.get('monitor')}` ({evaluation.get('mode')}): epoch "
            f"{evaluation.get('epoch')} (0-based), optimiser step {evaluation.get('global_step')}."
        )]
    return out


def _ordered_metrics(*tables: Mapping[str, float] | None) -> list[str]:
    keys = set().union(*(set(t) for t in tables if t))
    return [k for k in FIRST_METRICS if k in keys] + sorted(keys - set(FIRST_METRICS))


def _evaluation_section(evaluation: Mapping[str, Any] | None, data: Mapping[str, Any] | None) -> list[str]:
    if not evaluation or not evaluation.get("best"):
        return ["Not recorded: this adapter was saved outside a sam3lora training run."]
    start, best = evaluation.get("start"), evaluation["best"]
    val = next((s for s in (data or {}).get("splits", []) if s["role"] == "val"), None)
    where = f" (`{val['split']}`: {val['images']} images)" if val else ""
    out = [
        f"sam3lora's validation metrics on the validation split{where}, every category queried on every image: "
        "matched-instance mask IoU and Dice, SAM 3's cgF1 / IL_MCC / pmF1 (scores >= 0.5), COCO box and mask AP, "
        "and the validation loss. `start` is the base model before training (zero-shot); `best` is the weights in "
        "this folder.",
        "",
    ]
    header = ["metric"] + (["start (base, zero-shot)"] if start else []) + [f"best (epoch {evaluation.get('epoch')})"]
    rows = [[k] + ([start.get(k)] if start else []) + [best.get(k)] for k in _ordered_metrics(start, best)]
    out.append(_table(header, rows))
    if not evaluation.get("final"):
        out += ["", "Interim numbers: this card was written during training; it is rewritten when training ends."]
    elif not start:
        out += ["", "No start column: the run resumed from a checkpoint or skipped the zero-shot validation."]
    return out


def _lora_section(lora: Mapping[str, Any]) -> list[str]:
    settings = lora.get("settings") or {}
    rows = [
        [r["component"], r["kind"], r["rank"], f"{r['alpha']:g}" if r["alpha"] is not None else None, r["targets"],
         r["layers"] if r["layers"] else "all",
         r["adapted_layers"], f"{r['parameters']:,}"]
        for r in lora["components"]
    ]
    total, base = lora["adapter_parameters"], lora["base_parameters"]
    share = f" ({100 * total / base:.3f}% of the base's {base:,})" if base else ""
    rows.append(["total", "", "", "", "", "", sum(r["adapted_layers"] for r in lora["components"]), f"{total:,}"])
    out = []
    if settings:
        variant = settings.get("variant", "lora")
        scale = "alpha / sqrt(rank)" if variant == "rslora" else "alpha / rank"
        out.append(
            f"Variant `{variant}` (scale = {scale}), dropout {settings.get('dropout')}, init "
            f"`{settings.get('init')}`" + (
                f", trained in full: {', '.join(settings['modules_to_save'])}"
                if settings.get("modules_to_save") else ""
            ) + ". Every base weight is frozen."
        )
        out.append("")
    out.append(_table(
        ["component", "how", "rank", "alpha", "targets", "layers", "adapted Linear layers", "parameters"], rows
    ))
    out += ["", f"Adapter parameters: {total:,}{share}."]
    return out


def _usage_section(facts: Mapping[str, Any]) -> list[str]:
    _, base_arg, _ = _base_display(facts["base"])
    prompts = _example_prompts(facts.get("run"))
    text_flags = " ".join(f'--text "{p}"' for p in prompts)
    py_prompts = json.dumps(prompts)
    if facts["kind"] == "adapter":
        ref = facts.get("ref") or "adapter"
        cli_model = f"--base {base_arg} --adapter {ref}"
        load_args = f'"{base_arg}", adapter="{ref}"'
    else:
        ref = facts.get("ref") or "merged"
        cli_model = f"--base {ref}"
        load_args = f'"{ref}"'
    cli = f"sam3lora-predict images/ {text_flags} {cli_model} --out predictions"
    py = [
        "from sam3lora.inference import Sam3LoRAPredictor",
        "",
        f'predictor = Sam3LoRAPredictor.from_pretrained({load_args}, device="auto")',
        f'results = predictor.predict(["image.jpg"], text={py_prompts}, threshold=0.5)',
        "for found in results[0]:  # one PromptResult per prompt: masks (N,H,W), boxes (N,4) xyxy px, scores (N,)",
        "    print(found.prompt, found.scores.tolist())",
    ]
    seed_note = []
    match = re.fullmatch(r"tiny-seed(\d+)", str(facts["base"].get("name_or_path")))
    if facts["kind"] == "adapter" and match and match.group(1) != "0":
        seed_note = ["", f"(`--base tiny` builds seed 0; in Python pass `seed={match.group(1)}`.)"]
    return [
        "### With sam3lora",
        "",
        "```bash",
        "# with sam3lora installed (pip install -e . in its checkout)",
        cli,
        "```",
        "",
        "```python",
        *py,
        "```",
        *seed_note,
        "",
        "### With plain transformers" + (" + PEFT" if facts["kind"] == "adapter" else ""),
        "",
        "No sam3lora needed: these functions are sam3lora's own input preparation and post-processing "
        "(`sam3lora/sam3.py`, copied here), so the snippet reproduces `sam3lora-predict` on the same "
        "images: "
        "scores and boxes to 1e-5, identical masks (checked by sam3lora's `tests/test_model_card.py`).",
        "",
        "```python",
        snippet(facts),
        "```",
        "",
        PLAIN_TRANSFORMERS_NOTE,
    ]


def render(facts: Mapping[str, Any]) -> str:
    """The card (``README.md`` text) of ``facts``: ``kind`` (``adapter`` | ``merged``), ``base`` (portable
    fingerprint), ``lora`` (``lora_facts``), ``run`` (``run_facts``, or None), ``ref`` (how the usage code names
    this folder) and, for merged exports, ``adapter``, ``dtype`` and ``fingerprint`` (of the merged weights)."""
    base = facts["base"]
    run = facts.get("run") or {}
    data, training, evaluation = run.get("data"), run.get("training"), run.get("evaluation")
    base_text, _, _ = _base_display(base)
    subject = data["name"] if data else None
    n_categories = len((data or {}).get("categories") or [])
    what = f"{n_categories} categories of `{subject}`" if n_categories else f"`{subject}`"
    trained = f", trained with sam3lora on {what}" if subject else " made with sam3lora"
    if facts["kind"] == "adapter":
        title = "# SAM 3 LoRA adapter" + (f": {subject}" if subject else "")
        intro = (
            f"A LoRA adapter (PEFT format) for SAM 3{trained}. Base: {base_text}. Give it text prompts (and optional "
            "exemplar boxes) and it returns instance masks, boxes and scores."
        )
    else:
        title = "# SAM 3 fine-tuned with LoRA (merged)" + (f": {subject}" if subject else "")
        adapter = facts.get("adapter")
        intro = (
            f"SAM 3 with a LoRA adapter{f' (`{adapter}`)' if adapter else ''} merged into its weights: a plain "
            f"transformers `Sam3Model` (no PEFT needed){trained}. Base: {base_text}. Weights saved as "
            f"{facts.get('dtype') or 'float32'}."
        )
    fingerprint = [
        f"- architecture hash `{base.get('architecture')}`",
        f"- weights hash `{base.get('weights')}` (the first 4 weight tensors, rounded to bfloat16)",
    ]
    base_lines = [
        f"Base model: {base_text}.",
        "",
        "Fingerprint (`sam3lora.fingerprint.base_fingerprint`; sam3lora refuses to load this adapter onto a base whose "
        "fingerprint differs):" if facts["kind"] == "adapter" else
        "Fingerprint of that base (`sam3lora.fingerprint.base_fingerprint`), which the adapter was checked against:",
        "",
        *fingerprint,
    ]
    if facts["kind"] == "merged" and facts.get("fingerprint"):
        merged = facts["fingerprint"]
        base_lines += [
            "",
            f"This merged model's own fingerprint (what an adapter trained on top of it records): architecture "
            f"`{merged.get('architecture')}`, weights `{merged.get('weights')}`.",
        ]
    files = (
        ["- `adapter_config.json`, `adapter_model.safetensors`: the adapter in PEFT's format",
         "- `sam3lora.json`: base fingerprint, LoRA settings and the run facts this card was written from",
         "- `README.md`: this card"]
        if facts["kind"] == "adapter" else
        ["- `config.json`, `model.safetensors`: the merged `Sam3Model`",
         "- processor and tokenizer files: its `Sam3Processor`",
         "- `README.md`: this card"]
    )
    sections = [
        "---",
        yaml.safe_dump(_metadata(facts), sort_keys=False, allow_unicode=True).strip(),
        "---",
        "",
        title,
        "",
        intro,
        "",
        "## Base model",
        "",
        *base_lines,
        "",
        "## LoRA",
        "",
        *_lora_section(facts["lora"]),
        "",
        "## Data",
        "",
        *_data_section(data),
        "",
        "## Training",
        "",
        *_training_section(training, evaluation),
        "",
        "## Evaluation",
        "",
        *_evaluation_section(evaluation, data),
        "",
        "## How to use",
        "",
        *_usage_section(facts),
        "",
        "## Files",
        "",
        *files,
        "",
        "## Licence",
        "",
        _license(base)[1],
        "",
    ]
    return "\n".join(sections)
