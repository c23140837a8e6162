"""Make the ``tiny-pretrained`` base that the CPU demo fine-tunes.

LoRA adapts a *pretrained* model, so the demo needs a base that already segments something. This script trains
the whole tiny architecture (every weight, no adapters) on a synthetic domain whose categories differ from the
demo's (``PRETRAIN_CATEGORIES`` vs the demo's defaults), keeps the weights of the best validation epoch and
writes them (bfloat16) as a transformers directory, by default ``sam3lora/assets/tiny-pretrained`` (shipped).

    .venv/bin/python scripts/pretrain_tiny.py            # about 20 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

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


class KeepBest(L.Callback):
    """Keep a copy of the model's weights from the epoch with the best (``val/cgF1``, ``val/iou``)."""

    def __init__(self) -> None:
        self.best: tuple[float, float] = (-1.0, -1.0)
        self.state: dict[str, torch.Tensor] | None = None
        self.epoch = -1
        self.sums: dict[str, float] = {}
        self.steps = 0
        self.stage = ""

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        for key in ("train/loss", "train/loss_presence", "train/loss_ce", "train/loss_mask", "train/loss_bbox"):
            if key in trainer.callback_metrics:
                self.sums[key] = self.sums.get(key, 0.0) + float(trainer.callback_metrics[key])
        self.steps += 1

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        iou, cgf1, loss = (float(trainer.callback_metrics[k]) for k in ("val/iou", "val/cgF1", "val/loss"))
        train = " ".join(f"{k[6:]} {v / max(self.steps, 1):.2f}" for k, v in self.sums.items())
        epoch = trainer.current_epoch
        print(f"epoch {epoch}: val/iou {iou:.4f} cgF1 {cgf1:.2f} val/loss {loss:.2f} | {train}", flush=True)
        self.sums, self.steps = {}, 0
        if (cgf1, iou) > self.best:
            self.best, self.epoch = (cgf1, iou), f"{self.stage}:{trainer.current_epoch}"
            self.state = copy.deepcopy(pl_module.model.state_dict())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=PRETRAINED_DIR)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--warm-epochs", type=int, default=12,
                        help="first epochs without negative prompts (grounding before presence)")
    parser.add_argument("--train", type=int, default=128, help="training images")
    parser.add_argument("--val", type=int, default=16, help="validation images")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("overrides", nargs="*", help="extra conf/train.yaml overrides, e.g. loss.weight_dice=40")
    args = parser.parse_args(argv)

    L.seed_everything(args.seed, workers=True)
    work = Path(tempfile.mkdtemp(prefix="sam3lora-pretrain-"))
    data = write_synthetic(work / "data", train=args.train, val=args.val, categories=PRETRAIN_CATEGORIES, seed=101,
                           hard_negatives=0.0)
    overrides = [
        f"paths.root_dir={work}", f"data.root={data}", f"data.batch_size={args.batch_size}",
        f"module.optimizer.lr={args.lr}", "module.optimizer.weight_decay=0.05", "module.scheduler.warmup_steps=100",
        "module.metrics.ap_every_n_epochs=0", *args.overrides,
    ]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    model, processor = load_model("tiny", seed=args.seed)
    model.requires_grad_(True).train()
    module = instantiate(cfg.module, model=model, criterion=instantiate(cfg.loss))
    keep = KeepBest()
    # Curriculum: presence (is the prompt in the image?) is learnt last. Without negatives the per-query scores
    # first learn to ground words in pixels; then negatives teach presence on top of grounded features.
    stages = (("warm", args.warm_epochs, 0.0), ("main", args.epochs - args.warm_epochs, 1.0))
    for stage, epochs, negative_ratio in stages:
        if epochs <= 0:
            continue
        keep.stage = stage
        datamodule = instantiate(cfg.data, processor=processor, negative_ratio=negative_ratio)
        trainer = L.Trainer(
            max_epochs=epochs, accelerator="cpu", gradient_clip_val=1.0, logger=False, enable_checkpointing=False,
            callbacks=[keep], num_sanity_val_steps=0, enable_model_summary=False,
        )
        trainer.fit(module, datamodule=datamodule)
    model.load_state_dict(keep.state)
    with atomic_dir(args.out, overwrite=True) as tmp:
        model.to(torch.bfloat16).save_pretrained(tmp)
        processor.save_pretrained(tmp)
        record = {"preset": "tiny-pretrained", "categories": list(PRETRAIN_CATEGORIES), "epochs": args.epochs,
                  "warm_epochs": args.warm_epochs, "best_epoch": keep.epoch, "val_cgF1": keep.best[0],
                  "val_iou": keep.best[1], "train_images": args.train, "lr": args.lr, "overrides": args.overrides}
        (tmp / "sam3lora_preset.json").write_text(json.dumps(record, indent=2))
    print(f"wrote {args.out}: best epoch {keep.epoch}, val/cgF1 {keep.best[0]:.2f}, val/iou {keep.best[1]:.4f}")


if __name__ == "__main__":
    main()
