"""Make the ``tiny-pretrained`` base that the CPU demo fine-tunes.

LoRA adapts a *pretrained* model, so the demo needs a base that already segments something. This script trains
the whole tiny architecture (every weight, no adapters) on a synthetic domain whose categories differ from the
demo's (``PRETRAIN_CATEGORIES`` vs the demo's defaults), keeps the weights of the best validation epoch and
writes them (bfloat16) as a transformers directory, by default ``sam3lora/assets/tiny-pretrained`` (shipped).

Training runs in two stages (a curriculum): first without negative prompts (words are grounded in pixels), then
with them (presence: is the prompt in the image at all?).

    .venv/bin/python scripts/pretrain_tiny.py                       # fixed epochs (slow on 2 CPU cores)
    python scripts/pretrain_tiny.py --budget 300 --train 2048 \\
        --best-weights best.safetensors                               # GPU: epochs sized to 300 s, best kept on disk
    .venv/bin/python scripts/pretrain_tiny.py --weights best.safetensors  # package weights trained elsewhere
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from safetensors.torch import load_file, save_file

from sam3lora.data.synthetic import write_synthetic
from sam3lora.io import atomic_dir
from sam3lora.model import load_model
from sam3lora.model.tiny import PRETRAINED_DIR

ROOT = Path(__file__).resolve().parents[1]
# Every colour and shape word of the demo appears here, but never in the demo's combinations.
PRETRAIN_CATEGORIES = (
    "green circle", "red square", "blue triangle", "magenta star", "yellow ring", "cyan cross", "orange hexagon",
    "white diamond",
)
CALIBRATION_STEPS = 30


def cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of ``model``'s weights (bfloat16 floats, other dtypes as they are), tensors unshared."""
    return {k: (v.to(torch.bfloat16) if v.is_floating_point() else v).detach().cpu().clone()
            for k, v in model.state_dict().items()}


class KeepBest(L.Callback):
    """Keep the weights of the epoch with the best (``val/cgF1``, ``val/iou``); optionally write them at once."""

    def __init__(self, name: str = "", path: Path | None = None) -> None:
        self.name = f"[{name}] " if name else ""
        self.path = path
        self.best: tuple[float, float] = (-1.0, -1.0)
        self.state: dict[str, torch.Tensor] | None = None
        self.epoch = ""
        self.history: list[dict[str, Any]] = []
        self.sums: dict[str, float] = {}
        self.steps = 0
        self.stage = ""
        self.started = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        for key in ("train/loss", "train/loss_presence", "train/loss_ce", "train/loss_mask", "train/loss_dice",
                    "train/loss_bbox"):
            if key in trainer.callback_metrics:
                self.sums[key] = self.sums.get(key, 0.0) + float(trainer.callback_metrics[key])
        self.steps += 1

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        iou, cgf1, loss = (float(trainer.callback_metrics[k]) for k in ("val/iou", "val/cgF1", "val/loss"))
        train = {k[6:]: v / max(self.steps, 1) for k, v in self.sums.items()}
        epoch, elapsed = f"{self.stage}:{trainer.current_epoch}", time.perf_counter() - self.started
        self.history.append({"epoch": epoch, "s": round(elapsed, 1), "val_iou": iou, "val_cgF1": cgf1,
                             "val_loss": loss, **{f"train_{k}": v for k, v in train.items()}})
        text = " ".join(f"{k} {v:.2f}" for k, v in train.items())
        print(f"{self.name}{elapsed:6.0f}s epoch {epoch}: val/iou {iou:.4f} cgF1 {cgf1:.3f} val/loss {loss:.2f} | "
              f"{text}", flush=True)
        self.sums, self.steps = {}, 0
        if (cgf1, iou) > self.best:
            self.best, self.epoch = (cgf1, iou), epoch
            self.state = cpu_state(pl_module.model)
            if self.path is not None:
                tmp = self.path.with_name(self.path.name + ".tmp")
                save_file(self.state, str(tmp), metadata={"epoch": epoch, "val_iou": f"{iou:.4f}",
                                                          "val_cgF1": f"{cgf1:.4f}"})
                os.replace(tmp, self.path)


class StepTimer(L.Callback):
    """Seconds per training step, measured after the first ``skip`` steps."""

    def __init__(self, skip: int = 10) -> None:
        self.skip, self.count, self.start = skip, 0, 0.0

    def on_train_batch_end(self, *args: object) -> None:
        self.count += 1
        if self.count == self.skip:
            self.start = time.perf_counter()

    @property
    def seconds_per_step(self) -> float:
        return (time.perf_counter() - self.start) / max(self.count - self.skip, 1)


def write_pretrained(model: torch.nn.Module, processor: Any, out: Path, record: dict[str, Any]) -> None:
    """Write ``model`` (bfloat16) and ``processor`` as a transformers directory at ``out``, whole or not at all."""
    with atomic_dir(out, overwrite=True) as tmp:
        model.to(torch.bfloat16).save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / "sam3lora_preset.json").write_text(json.dumps(record, indent=2))
    print(f"wrote {out}: {json.dumps({k: record[k] for k in ('best_epoch', 'val_cgF1', 'val_iou') if k in record})}")


def package(weights: Path, out: Path, seed: int, record_path: Path | None) -> None:
    """Package weights trained elsewhere (``--best-weights`` of another run) as the preset directory."""
    model, processor = load_model("tiny", seed=seed)
    state = load_file(str(weights))
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    if unexpected or [k for k in missing if "position_ids" not in k]:
        raise SystemExit(f"{weights}: does not fit the tiny architecture (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]})")
    record = json.loads(record_path.read_text()) if record_path else {}
    write_pretrained(model, processor, out, {"preset": "tiny-pretrained", "categories": list(PRETRAIN_CATEGORIES),
                                             **record})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=PRETRAINED_DIR)
    parser.add_argument("--epochs", type=int, default=40, help="all epochs (ignored with --budget)")
    parser.add_argument("--warm-epochs", type=int, default=12,
                        help="first epochs without negative prompts (grounding before presence)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds of training: a short calibration sizes both stages' epochs to fit")
    parser.add_argument("--warm-fraction", type=float, default=0.35, help="with --budget: share of the warm stage")
    parser.add_argument("--train", type=int, default=128, help="training images")
    parser.add_argument("--val", type=int, default=16, help="validation images")
    parser.add_argument("--data", type=Path, default=None, help="a synthetic set made earlier (shared by runs)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: the data config's)")
    parser.add_argument("--accelerator", default="auto", help="cpu | gpu | auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="", help="prefix of the printed lines (parallel runs)")
    parser.add_argument("--best-weights", type=Path, default=None,
                        help="write the best weights here (safetensors, bf16) whenever they improve")
    parser.add_argument("--history", type=Path, default=None, help="write the per-epoch metrics here (JSON)")
    parser.add_argument("--no-out", action="store_true", help="do not write the preset directory")
    parser.add_argument("--init", type=Path, default=None,
                        help="start from these weights (from --best-weights) instead of the random tiny preset")
    parser.add_argument("--weights", type=Path, default=None,
                        help="no training: package these weights (from --best-weights) as --out")
    parser.add_argument("--record", type=Path, default=None, help="with --weights: a JSON of facts to store")
    parser.add_argument("overrides", nargs="*", help="extra conf/train.yaml overrides, e.g. loss.weight_dice=40")
    args = parser.parse_args(argv)
    if args.weights is not None:
        package(args.weights, args.out, args.seed, args.record)
        return

    started = time.perf_counter()
    torch.set_float32_matmul_precision("high")
    L.seed_everything(args.seed, workers=True)
    work = Path(tempfile.mkdtemp(prefix="sam3lora-pretrain-"))
    data = args.data or write_synthetic(work / "data", train=args.train, val=args.val,
                                        categories=PRETRAIN_CATEGORIES, seed=101, hard_negatives=0.0)
    overrides = [
        f"paths.root_dir={work}", f"data.root={data}", f"data.batch_size={args.batch_size}",
        f"module.optimizer.lr={args.lr}", "module.optimizer.weight_decay=0.05", "module.scheduler.warmup_steps=100",
        "module.metrics.ap_every_n_epochs=0", *args.overrides,
    ]
    if args.workers is not None:
        overrides.append(f"data.num_workers={args.workers}")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    model, processor = load_model("tiny", seed=args.seed)
    if args.init is not None:
        model.load_state_dict({k: v.float() for k, v in load_file(str(args.init)).items()})
    model.requires_grad_(True).train()
    criterion = instantiate(cfg.loss)
    presence_weight = criterion.weight_dict["loss_presence"]
    module = instantiate(cfg.module, model=model, criterion=criterion)
    keep = KeepBest(args.name, args.best_weights)
    trainer_kwargs = dict(accelerator=args.accelerator, devices=1, gradient_clip_val=1.0, logger=False,
                          enable_checkpointing=False, num_sanity_val_steps=0, enable_model_summary=False,
                          enable_progress_bar=False)

    # Curriculum: presence (is the prompt in the image?) is learnt last. Without negatives the per-query scores
    # first learn to ground words in pixels; then negatives teach presence on top of grounded features. The warm
    # stage does not train presence at all: with every prompt present, its logit runs into SAM 3's clamp (+-10),
    # where the gradient is zero, and presence then stays at chance once negatives arrive.
    warm_epochs, main_epochs = args.warm_epochs, args.epochs - args.warm_epochs
    if args.budget is not None:
        datamodule = instantiate(cfg.data, processor=processor, negative_ratio=1.0)
        timer = StepTimer()
        L.Trainer(max_steps=CALIBRATION_STEPS, limit_val_batches=0, callbacks=[timer], **trainer_kwargs).fit(
            module, datamodule=datamodule)
        steps_per_epoch = len(datamodule.train_dataloader())
        epoch_s = timer.seconds_per_step * steps_per_epoch * 1.1  # + validation
        left = args.budget - (time.perf_counter() - started)
        warm_epochs = max(1, int(left * args.warm_fraction / epoch_s)) if args.warm_fraction > 0 else 0
        main_epochs = max(1, int(left * (1 - args.warm_fraction) / epoch_s))
        print(f"[{args.name}] calibration: {timer.seconds_per_step * 1000:.0f} ms/step, {steps_per_epoch} steps/epoch,"
              f" {left:.0f} s left -> {warm_epochs} warm + {main_epochs} main epochs", flush=True)
    stages = (("warm", warm_epochs, 0.0), ("main", main_epochs, 1.0))
    for stage, epochs, negative_ratio in stages:
        if epochs <= 0:
            continue
        keep.stage = stage
        criterion.weight_dict["loss_presence"] = presence_weight if negative_ratio > 0 else 0.0
        datamodule = instantiate(cfg.data, processor=processor, negative_ratio=negative_ratio)
        limit = None
        if args.budget is not None:  # a hard stop in case the calibration was optimistic
            left = args.budget - (time.perf_counter() - started)
            limit = {"seconds": max(left * (args.warm_fraction if stage == "warm" else 1.0), 1.0)}
        trainer = L.Trainer(max_epochs=epochs, max_time=limit, callbacks=[keep], **trainer_kwargs)
        trainer.fit(module, datamodule=datamodule)
    record = {"preset": "tiny-pretrained", "categories": list(PRETRAIN_CATEGORIES), "warm_epochs": warm_epochs,
              "main_epochs": main_epochs, "best_epoch": keep.epoch, "val_cgF1": keep.best[0], "val_iou": keep.best[1],
              "train_images": args.train, "init": str(args.init) if args.init else None,
              "batch_size": args.batch_size, "lr": args.lr, "overrides": args.overrides,
              "seconds": round(time.perf_counter() - started)}
    if args.history is not None:
        args.history.write_text(json.dumps({"record": record, "history": keep.history}, indent=2))
    print(f"[{args.name}] best {keep.epoch}: val/cgF1 {keep.best[0]:.3f} val/iou {keep.best[1]:.4f}", flush=True)
    if not args.no_out and keep.state is not None:
        model.load_state_dict({k: v.float() for k, v in keep.state.items()})
        write_pretrained(model, processor, args.out, record)


if __name__ == "__main__":
    main()
