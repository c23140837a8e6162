"""Make the ``tiny-pretrained`` base that the CPU demo fine-tunes, in as many sessions as it takes.

LoRA adapts a *pretrained* model, so the demo needs a base that already segments something. This script trains
the whole tiny architecture (every weight, no adapters) on a synthetic domain whose categories differ from the
demo's (``PRETRAIN_CATEGORIES`` vs the demo's), and keeps the weights of the best validation.

* The images are rendered **once** into a tensor file (``--cache``, keyed by the generator settings) and reused by
  every run; batches are cut and augmented from tensors on the training device (``sam3lora.training.pretrain``).
* A run lives in ``--state DIR``: ``state.pt`` (weights, optimiser, schedule, step, RNG, best, history; written
  whole or not at all, at every validation, every ``--save-every`` seconds and when the session ends), the best
  weights ``best.safetensors`` (bf16) and ``history.json``. ``--resume`` continues it exactly where it stopped, on
  any device, so CPU hours and a lent GPU add up. SIGINT / SIGTERM (``timeout``) end a session cleanly after the
  current step.
* Curriculum: the first ``--warm-steps`` have no negative prompts and no presence loss (words are grounded in
  pixels first; with every prompt present the presence logit runs into SAM 3's +-10 clamp), then negatives and
  presence.

    python scripts/pretrain_tiny.py --state runs/pre --steps 20000 --budget 3000       # first session
    python scripts/pretrain_tiny.py --state runs/pre --resume --budget 3000            # every later one
    python scripts/pretrain_tiny.py --benchmark 5 --batch-size 8                      # image passes/s here
    python scripts/pretrain_tiny.py --state runs/pre --resume --evaluate              # metrics of the last state
    python scripts/pretrain_tiny.py --weights runs/pre/best.safetensors \\
        --record runs/pre/history.json --out sam3lora/assets/tiny-pretrained           # ship the best weights
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from safetensors.torch import load_file, save_file
from torch.utils.flop_counter import FlopCounterMode

from sam3lora.io import atomic_dir, atomic_file
from sam3lora.model import load_model
from sam3lora.model.tiny import TINY_IMAGE_SIZE, TINY_VARIANTS, materialise_tiny, sam3lora_home
from sam3lora.training.pretrain import (
    Pretrainer,
    PretrainSettings,
    RenderSettings,
    epochs_of,
    load_or_render,
    load_state,
    settings_from_dict,
    spread_reference_boxes,
)

ROOT = Path(__file__).resolve().parents[1]
# Every colour and shape word of the demo appears here, but never in the demo's combinations.
PRETRAIN_CATEGORIES = (
    "green circle", "red square", "blue triangle", "magenta star", "yellow ring", "cyan cross", "orange hexagon",
    "white diamond",
)
DATA_SEED = 101
# loss.weight_dice=40: small masks, at SAM 3's 10 the focal term empties them first. loss.o2m.enabled=false: from
# scratch the DAC queries cost ~10% per step and did not help (docs/training.md, "Diagnosis (CPU, this session)").
DEFAULT_OVERRIDES = ("loss.weight_dice=40", "loss.o2m.enabled=false")
# The CPU-pretraining architecture (issue #12): 12x fewer FLOPs per image pass than ``tiny``, same classes.
DEFAULT_VARIANT = "tiny-fast"
STATE_FILE, BEST_FILE, HISTORY_FILE = "state.pt", "best.safetensors", "history.json"


def cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of ``model``'s weights (bfloat16 floats, other dtypes as they are), tensors unshared."""
    return {k: (v.to(torch.bfloat16) if v.is_floating_point() else v).detach().cpu().clone()
            for k, v in model.state_dict().items()}


def write_pretrained(model: torch.nn.Module, processor: Any, out: Path, record: dict[str, Any]) -> None:
    """Write ``model`` (bfloat16) and ``processor`` as a transformers directory at ``out``, whole or not at all."""
    with atomic_dir(out, overwrite=True) as tmp:
        model.to(torch.bfloat16).save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / "sam3lora_preset.json").write_text(json.dumps(record, indent=2))
    print(f"wrote {out}: {json.dumps({k: record[k] for k in ('best_step', 'val_cgF1', 'val_iou') if k in record})}")


def load_weights(model: torch.nn.Module, weights: Path) -> None:
    """Load safetensors weights (a run's ``best.safetensors``, or a preset directory such as the shipped
    ``sam3lora/assets/tiny-pretrained``) into the tiny ``model``; anything that does not fit is an error."""
    if weights.is_dir():
        weights = weights / "model.safetensors"
    state = load_file(str(weights))
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    if unexpected or [k for k in missing if "position_ids" not in k]:
        raise SystemExit(f"{weights}: does not fit the tiny architecture (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]})")


def load_variant(variant: str, seed: int) -> tuple[torch.nn.Module, Any]:
    """A tiny variant (``sam3lora.model.tiny.TINY_VARIANTS``) with random weights from ``seed``, loaded through
    ``from_pretrained`` as every other base, and its processor."""
    return load_model(str(materialise_tiny(seed, variant=variant)), dtype="float32", seed=seed)


def package(weights: Path, out: Path, seed: int, record_path: Path | None, variant: str) -> None:
    """Package weights trained elsewhere (a run's ``best.safetensors``) as the preset directory ``out``; the
    architecture is the record's ``variant`` (a run's history.json has it), else ``variant``."""
    record: dict[str, Any] = {}
    if record_path is not None:
        data = json.loads(record_path.read_text())
        record = data.get("record", data)  # a run's history.json or a plain JSON of facts
    model, processor = load_variant(record.get("variant", variant), seed)
    load_weights(model, weights)
    write_pretrained(model, processor, out, {"preset": "tiny-pretrained", "categories": list(PRETRAIN_CATEGORIES),
                                             **record})


class StopFlag:
    """SIGINT / SIGTERM set a flag; the loop ends the session after the current step (state saved whole)."""

    def __init__(self) -> None:
        self.stop = False
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: object) -> None:
        if self.stop:  # a second signal: leave now (the last saved state stays as it was)
            raise KeyboardInterrupt
        self.stop = True
        print(f"signal {signum}: stopping after this step", flush=True)


def build(args: argparse.Namespace, settings: PretrainSettings, overrides: list[str], data: dict[str, Any],
          device: torch.device, variant: str) -> tuple[Pretrainer, Any, Any]:
    """The trainer (model, criterion, data on ``device``) and the validation set for a run's fixed settings."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["module.metrics.ap_every_n_epochs=0", *overrides])
    cache = Path(args.cache)
    train = load_or_render(RenderSettings(data["train"], data["size"], data["seed"], tuple(data["categories"])),
                           cache)
    val = load_or_render(RenderSettings(data["val"], data["size"], data["seed"], tuple(data["categories"]),
                                        split="val"), cache)
    model, processor = load_variant(variant, settings.seed)
    model.requires_grad_(True).train()
    module = instantiate(cfg.module, model=model, criterion=instantiate(cfg.loss))
    ip = processor.image_processor
    trainer = Pretrainer(module, train, settings, processor.tokenizer, ip.image_mean, ip.image_std, device=device)
    return trainer, val, processor


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


COMPONENTS = ("vision_encoder", "text_encoder", "detr_encoder", "detr_decoder", "mask_decoder")


def count_flops(trainer: Pretrainer) -> dict[str, Any]:
    """FLOPs of one training step (forward + backward, ``torch.utils.flop_counter``) per image pass, and of its
    forward per image and component (``COMPONENTS``; ``other``: heads, DAC copy, the rest). The step is taken."""
    prefix = f"{type(trainer.module).__name__}.model."
    step = FlopCounterMode(display=False)
    images = trainer.images_seen
    with step:
        trainer.train_step()
    images = trainer.images_seen - images
    batch = trainer.maker(trainer._indices(trainer.step), torch.Generator(trainer.device).manual_seed(0))
    forward = FlopCounterMode(display=False)
    with torch.no_grad(), forward:
        trainer.module(batch)
    counts = forward.get_flop_counts()
    parts = {c: sum(counts.get(prefix + c, {}).values()) / batch.num_images / 1e9 for c in COMPONENTS}
    total = forward.get_total_flops() / batch.num_images / 1e9
    parts["other"] = total - sum(parts.values())
    return {"gflop_per_pass": round(step.get_total_flops() / images / 1e9, 3),
            "forward_gflop_per_image": round(total, 3),
            "forward_rows_per_image": round(batch.num_rows / batch.num_images, 2),
            "forward_gflop_by_component": {k: round(v, 3) for k, v in parts.items()}}


def benchmark(trainer: Pretrainer, steps: int, warmup: int = 2) -> dict[str, Any]:
    """Image passes per second of training steps (after ``warmup`` steps) and FLOPs per pass; nothing is written."""
    for _ in range(warmup):
        trainer.train_step()
    flops = count_flops(trainer)
    sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)
    sync()
    started, images = time.perf_counter(), trainer.images_seen
    for _ in range(steps):
        trainer.train_step()
    sync()
    seconds = time.perf_counter() - started
    passes = trainer.images_seen - images
    return {"device": str(trainer.device), "variant": trainer.meta.get("variant"), "threads": torch.get_num_threads(),
            "batch_size": trainer.settings.batch_size, "bf16": trainer.settings.bf16, "steps": steps,
            "ms_per_step": round(seconds / steps * 1000, 1), "images_per_s": round(passes / seconds, 2),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None, **flops}


def validate(trainer: Pretrainer, val: Any, state_dir: Path, name: str, train_sums: dict[str, float],
             train_steps: int) -> None:
    """Validate, append to the history, keep the best weights (``best.safetensors``) when (cgF1, iou) improves."""
    metrics = trainer.validate(val)
    iou, cgf1 = metrics["val/iou"], metrics["val/cgF1"]
    train = {f"train_{k}": v / max(train_steps, 1) for k, v in train_sums.items()}
    entry = {"step": trainer.step, "images_seen": trainer.images_seen, "epochs": round(epochs_of(trainer), 2),
             "seconds": round(trainer.seconds, 1), "lr": trainer.scheduler.get_last_lr()[0],
             **{k.replace("/", "_"): v for k, v in metrics.items()}, **train}
    trainer.history.append(entry)
    best = (trainer.best.get("val_cgF1", -1.0), trainer.best.get("val_iou", -1.0))
    mark = ""
    if (cgf1, iou) > best:
        trainer.best = {"step": trainer.step, "images_seen": trainer.images_seen, "val_cgF1": cgf1, "val_iou": iou}
        with atomic_file(state_dir / BEST_FILE) as tmp:
            save_file(cpu_state(trainer.module.model), str(tmp),
                      metadata={k: str(v) for k, v in trainer.best.items()})
        mark = " (best)"
    losses = " ".join(f"{k[11:]} {v:.2f}" for k, v in train.items() if k.startswith("train_loss_") and v)
    print(f"{name}step {trainer.step} ({trainer.images_seen} images, {epochs_of(trainer):.1f} epochs, "
          f"{trainer.seconds:.0f} s): val/iou {iou:.4f} cgF1 {cgf1:.3f} val/loss {metrics['val/loss']:.2f}{mark} | "
          f"loss {train.get('train_loss', float('nan')):.2f} {losses}", flush=True)


def save(trainer: Pretrainer, state_dir: Path) -> None:
    trainer.save(state_dir / STATE_FILE)
    record = {**trainer.meta, "step": trainer.step, "images_seen": trainer.images_seen,
              "train_seconds": round(trainer.seconds), "best": trainer.best}
    with atomic_file(state_dir / HISTORY_FILE) as tmp:
        tmp.write_text(json.dumps({"record": record, "history": trainer.history}, indent=2))


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--state", type=Path, default=None, help="the run's directory (state.pt, best.safetensors, ...)")
    p.add_argument("--resume", action="store_true", help="continue the run in --state (its settings are kept)")
    p.add_argument("--budget", type=float, default=None, help="seconds of training in this session")
    p.add_argument("--steps", type=int, default=None,
                   help="optimiser steps of the whole run, all sessions (default 20000); with --resume, a new "
                        "total stretches the cosine schedule from the current step")
    p.add_argument("--warm-steps", type=int, default=None, help="first steps without negatives (default 10%%)")
    p.add_argument("--train", type=int, default=2048, help="training images (rendered once, cached)")
    p.add_argument("--val", type=int, default=64, help="validation images")
    p.add_argument("--cache", type=Path, default=None,
                   help="rendered tensor sets (default $SAM3LORA_HOME/pretrain-cache)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast (GPUs)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variant", default=DEFAULT_VARIANT, choices=sorted(TINY_VARIANTS),
                   help=f"architecture of a new run (default {DEFAULT_VARIANT}; a resumed run keeps its own)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--val-every", type=int, default=500, help="validate (and save) every N steps")
    p.add_argument("--save-every", type=float, default=300.0, help="save the state at least every N seconds")
    p.add_argument("--name", default="", help="prefix of the printed lines (parallel runs)")
    p.add_argument("--reference-boxes", type=float, default=0.2, metavar="SIZE",
                   help="a new run from random weights spreads the queries' reference boxes over the image (uniform "
                        "centres, w = h = SIZE; 0: transformers' init, every box at the centre; docs/training.md)")
    p.add_argument("--init", type=Path, default=None,
                   help="a new run starts from these weights (safetensors, or a preset directory)")
    p.add_argument("--out", type=Path, default=None,
                   help="when the run completes, write the best weights as a preset directory here")
    p.add_argument("--benchmark", type=int, default=None, metavar="STEPS",
                   help="print image passes/s over STEPS training steps (JSON) and exit; nothing is written")
    p.add_argument("--evaluate", action="store_true",
                   help="with --resume: validate the run's last state, print the metrics (JSON) and exit")
    p.add_argument("--weights", type=Path, default=None,
                   help="no training: package these weights (a run's best.safetensors) as --out")
    p.add_argument("--record", type=Path, default=None, help="with --weights: a JSON of facts (history.json)")
    p.add_argument("overrides", nargs="*", help="conf/train.yaml loss./module. overrides, e.g. loss.weight_dice=40")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.weights is not None:
        if args.out is None:
            raise SystemExit("--weights needs --out (e.g. sam3lora/assets/tiny-pretrained)")
        package(args.weights, args.out, args.seed, args.record, args.variant)
        return
    args.cache = args.cache or sam3lora_home() / "pretrain-cache"
    device = pick_device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    name = f"[{args.name}] " if args.name else ""

    state: dict[str, Any] | None = None
    state_dir: Path | None = args.state
    if args.benchmark is None:
        if state_dir is None:
            raise SystemExit("--state DIR is needed (where the run is kept), or --benchmark / --weights")
        if args.evaluate and not args.resume:
            raise SystemExit("--evaluate needs --resume (it validates the run's last state)")
        if args.resume:
            if not (state_dir / STATE_FILE).is_file():
                raise SystemExit(f"--resume: {state_dir / STATE_FILE} does not exist")
            state = load_state(state_dir / STATE_FILE)
        elif (state_dir / STATE_FILE).exists():
            raise SystemExit(f"{state_dir} holds a run already: pass --resume to continue it, or choose another "
                             "--state")
    if state is not None:
        settings = settings_from_dict(state["settings"])
        meta = state["meta"]
        overrides, data = list(meta["overrides"]), dict(meta["data"])
        if args.steps is not None and args.steps != settings.steps:
            print(f"{name}total steps {settings.steps} -> {args.steps}", flush=True)
            settings.steps = args.steps
        settings.bf16 = args.bf16 or (settings.bf16 and device.type == "cuda")
    else:
        steps = args.steps or 20000
        settings = PretrainSettings(
            steps=steps, warm_steps=args.warm_steps if args.warm_steps is not None else steps // 10,
            batch_size=args.batch_size, lr=args.lr, seed=args.seed, bf16=args.bf16)
        overrides = [*DEFAULT_OVERRIDES, *args.overrides]
        data = {"train": args.train, "val": args.val, "size": TINY_IMAGE_SIZE, "seed": DATA_SEED,
                "categories": list(PRETRAIN_CATEGORIES)}
        meta = {"variant": args.variant, "overrides": overrides, "data": data,
                "init": str(args.init) if args.init else None,
                "reference_boxes": args.reference_boxes if args.init is None else None, "sessions": []}
    started = time.perf_counter()
    trainer, val, processor = build(args, settings, overrides, data, device, meta.get("variant", "tiny"))
    if args.benchmark is not None:
        trainer.meta = meta
        print(json.dumps(benchmark(trainer, args.benchmark)), flush=True)
        return
    assert state_dir is not None
    if state is not None:
        trainer.load_state_dict(state)
        del state
        if args.evaluate:
            metrics = trainer.validate(val)
            print(json.dumps({"variant": meta.get("variant", "tiny"), "step": trainer.step,
                              "images_seen": trainer.images_seen, "train_seconds": round(trainer.seconds),
                              "val_images": len(val), **metrics}), flush=True)
            return
    elif args.init is not None:
        load_weights(trainer.module.model, args.init)
    elif args.reference_boxes > 0:
        spread_reference_boxes(trainer.module.model, settings.seed, args.reference_boxes)
    trainer.meta = meta
    session = {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": device_name(device),
               "from_step": trainer.step, "to_step": trainer.step, "seconds": 0.0, "images": 0}
    trainer.meta.setdefault("sessions", []).append(session)
    print(f"{name}{'resumed' if args.resume else 'new run'} at step {trainer.step}/{settings.steps} on "
          f"{session['device']} ({len(trainer.train_data)} images, batch {settings.batch_size}, "
          f"{trainer.steps_per_epoch} steps/epoch, setup {time.perf_counter() - started:.0f} s)", flush=True)

    stop = StopFlag()
    budget_end = None if args.budget is None else started + args.budget
    last_save = time.perf_counter()
    sums: dict[str, float] = {}
    count, session_images = 0, trainer.images_seen
    while trainer.step < settings.steps and not stop.stop:
        if budget_end is not None and time.perf_counter() >= budget_end:
            break
        t0 = time.perf_counter()
        losses = trainer.train_step()
        trainer.seconds += time.perf_counter() - t0
        session["seconds"] += time.perf_counter() - t0
        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + v
        count += 1
        session["to_step"], session["images"] = trainer.step, trainer.images_seen - session_images
        if trainer.step % args.val_every == 0 or trainer.step == settings.steps:
            validate(trainer, val, state_dir, name, sums, count)
            sums, count = {}, 0
            save(trainer, state_dir)
            last_save = time.perf_counter()
        elif time.perf_counter() - last_save >= args.save_every:
            save(trainer, state_dir)
            last_save = time.perf_counter()
    session["images_per_s"] = round(session["images"] / max(session["seconds"], 1e-9), 2)
    session["seconds"] = round(session["seconds"], 1)
    save(trainer, state_dir)
    print(f"{name}session: steps {session['from_step']} -> {trainer.step} ({session['images']} images, "
          f"{session['seconds']:.0f} s, {session['images_per_s']} images/s); run: {trainer.images_seen} images, "
          f"{trainer.seconds:.0f} s; best {trainer.best}; state in {state_dir}", flush=True)
    if trainer.step >= settings.steps and args.out is not None and (state_dir / BEST_FILE).is_file():
        record = {**trainer.meta, "best_step": trainer.best.get("step"), "val_cgF1": trainer.best.get("val_cgF1"),
                  "val_iou": trainer.best.get("val_iou"), "images_seen": trainer.images_seen,
                  "train_seconds": round(trainer.seconds), "settings": asdict(settings)}
        model = trainer.module.model
        model.load_state_dict({k: v.float() for k, v in load_file(str(state_dir / BEST_FILE)).items()})
        write_pretrained(model.cpu(), processor, args.out, record)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


if __name__ == "__main__":
    sys.exit(main())
