"""Where a pretrained tiny base loses val/iou (issue #12): measurements, no training.

* ``ceiling``: the IoU a *perfect* mask keeps after area-down-sampling to a model's mask side and bilinear
  up-sampling back (what the model's ``pred_masks`` resolution allows at best), on the rendered ground truth.
* ``overfit``: train a new tiny variant on the first N training images (no augmentation) and validate on those
  same images every ``--val-every`` steps: can the architecture and recipe fit them at all (one JSON line per
  validation; ``--reference-boxes 0`` for transformers' query init, ``loss.*`` overrides as the pretraining's).
* ``breakdown``: for given weights, the matched-query mask IoU (val/iou's quantity) split by row kind: rows with a
  single instance of the prompted category, and instances that share their row with others of the same category,
  apart or touching (within 2 px); beside it the best IoU any query reaches, the semantic head's IoU with the union
  of the row's instances, the matched box IoU and score, and the presence probability on positive and negative rows.

    python scripts/diagnose_pretrain.py ceiling --sides 16 32 64
    python scripts/diagnose_pretrain.py overfit --images 16 --steps 800 --val-every 50 --budget 840
    python scripts/diagnose_pretrain.py breakdown --weights pretrain_runs/fast-cpu/best.safetensors \\
        --variant tiny-fast --split val --images 64

Each prints JSON (``overfit``: one line per validation). The data are the pretraining sets of
``scripts/pretrain_tiny.py`` (its cache).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch import Tensor
from torchvision.ops import box_iou

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pretrain_tiny import DATA_SEED, DEFAULT_OVERRIDES, PRETRAIN_CATEGORIES, ROOT, load_weights  # noqa: E402

from sam3lora.metrics import mask_iou  # noqa: E402
from sam3lora.model import load_model  # noqa: E402
from sam3lora.model.tiny import TINY_IMAGE_SIZE, TINY_VARIANTS, materialise_tiny, sam3lora_home  # noqa: E402
from sam3lora.sam3 import sam3_scores  # noqa: E402
from sam3lora.training import pretrain  # noqa: E402

TOUCH_PX = 2


def pretraining_set(split: str, images: int, cache: Path) -> pretrain.TensorSet:
    """The first ``images`` of the pretraining ``split`` (train: the 2048-image set, val: the 64-image set)."""
    count = 2048 if split == "train" else 64
    settings = pretrain.RenderSettings(count, TINY_IMAGE_SIZE, DATA_SEED, PRETRAIN_CATEGORIES, split=split)
    data = pretrain.load_or_render(settings, cache)
    n = min(images, len(data))
    return pretrain.TensorSet(data.images[:n], data.labels[:n], data.instance_categories[:n], data.categories)


def instance_masks(data: pretrain.TensorSet) -> Tensor:
    """Every instance of ``data`` as a float mask (N,1,S,S)."""
    slots = torch.arange(1, data.instance_categories.shape[1] + 1, dtype=torch.uint8)
    masks = (data.labels[:, None] == slots[None, :, None, None]).flatten(0, 1)
    return masks[masks.flatten(1).any(1)].float()[:, None]


def resolution_ceiling(masks: Tensor, side: int) -> Tensor:
    """IoU (N,) of masks (N,1,S,S) with themselves after area pooling to ``side`` and bilinear up-sampling, cut at
    0.5: the best a model predicting ``side`` x ``side`` masks can reach (validation's up-sampling)."""
    low = F.adaptive_avg_pool2d(masks, side)
    up = F.interpolate(low, size=masks.shape[-2:], mode="bilinear", align_corners=False) > 0.5
    gt = masks.bool()
    return (up & gt).flatten(1).sum(1) / (up | gt).flatten(1).sum(1)


def ceiling(args: argparse.Namespace) -> dict[str, Any]:
    masks = instance_masks(pretraining_set(args.split, args.images, args.cache))
    area = masks.flatten(1).sum(1)
    small = area < area.quantile(0.25)
    result: dict[str, Any] = {"split": args.split, "instances": len(masks), "area_px_median": float(area.median())}
    for side in args.sides:
        iou = resolution_ceiling(masks, side)
        result[f"side_{side}"] = {"mean": round(float(iou.mean()), 3), "p10": round(float(iou.quantile(0.1)), 3),
                                  "smallest_quarter_mean": round(float(iou[small].mean()), 3)}
    return result


def build_module(variant: str, weights: Path | None, overrides: list[str] | None = None) -> tuple[Any, Any]:
    """The pretraining module (the variant with ``weights``, or its seed-0 random weights when None; the
    pretraining criterion plus ``overrides``) and its processor."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["module.metrics.ap_every_n_epochs=0", *DEFAULT_OVERRIDES,
                                          *(overrides or [])])
    model, processor = load_model(str(materialise_tiny(0, variant=variant)), dtype="float32", seed=0)
    if weights is not None:
        load_weights(model, weights)
    return instantiate(cfg.module, model=model, criterion=instantiate(cfg.loss)), processor


def overfit(args: argparse.Namespace) -> dict[str, Any]:
    """Train on ``args.images`` fixed training images without augmentation, validate on the same images."""
    data = pretraining_set("train", args.images, args.cache)
    module, processor = build_module(args.variant, None, args.overrides)
    module.model.requires_grad_(True).train()
    if args.reference_boxes > 0:
        pretrain.spread_reference_boxes(module.model, 0, args.reference_boxes)
    settings = pretrain.PretrainSettings(steps=args.steps, warm_steps=args.steps // 10,
                                         batch_size=min(16, len(data)), lr=args.lr)
    ip = processor.image_processor
    trainer = pretrain.Pretrainer(module, data, settings, processor.tokenizer, ip.image_mean, ip.image_std)
    trainer.maker.augment = None
    started = time.perf_counter()
    metrics: dict[str, Any] = {}
    while trainer.step < args.steps and time.perf_counter() - started < args.budget:
        trainer.train_step()
        if trainer.step % args.val_every == 0 or trainer.step == args.steps:
            metrics = {"step": trainer.step, "passes": trainer.images_seen,
                       "seconds": round(time.perf_counter() - started),
                       **{k: round(v, 4) for k, v in trainer.validate(data).items()}}
            print(json.dumps(metrics), flush=True)
    return metrics


@torch.no_grad()
def breakdown(args: argparse.Namespace) -> dict[str, Any]:
    data = pretraining_set(args.split, args.images, args.cache)
    module, processor = build_module(args.variant, args.weights)
    module.eval()
    ip = processor.image_processor
    maker = pretrain.BatchMaker.build(data, processor.tokenizer, ip.image_mean, ip.image_std, negative_ratio=None)
    size = data.size
    values: dict[str, list[float]] = defaultdict(list)
    for start in range(0, len(data), 16):
        batch = maker(torch.arange(start, min(start + 16, len(data))))
        out = module(batch)
        indices = module.criterion.match(out, batch.targets)
        scores = sam3_scores(out["pred_logits"], out["presence_logits"])
        masks = F.interpolate(out["pred_masks"].float(), size=size, mode="bilinear") > 0
        semantic = F.interpolate(out["semantic_seg"].float(), size=size, mode="bilinear")[:, 0] > 0
        presence = out["presence_logits"][:, 0].sigmoid()
        for r, target in enumerate(batch.targets):
            gt = target["masks"].bool()
            if len(gt) == 0:
                values["presence_negative_rows"].append(float(presence[r]))
                continue
            values["presence_positive_rows"].append(float(presence[r]))
            ious = mask_iou(masks[r], gt)  # (Q,G)
            q, j = indices[r]
            matched = ious[q, j]
            values["matched_iou"] += matched.tolist()
            values["best_query_iou"] += ious.max(0).values.tolist()
            values["matched_box_iou"] += box_iou(out["pred_boxes"][r, q], target["boxes"][j]).diag().tolist()
            values["matched_score"] += scores[r, q].tolist()
            union = gt.any(0)
            values["semantic_iou"].append(float((semantic[r] & union).sum() / (semantic[r] | union).sum()))
            if len(gt) == 1:
                values["matched_iou_single"] += matched.tolist()
                continue
            near = F.max_pool2d(gt.float()[:, None], 2 * TOUCH_PX + 1, 1, TOUCH_PX)[:, 0] > 0
            for iou, k in zip(matched.tolist(), j.tolist(), strict=True):
                others = torch.cat([gt[:k], gt[k + 1:]]).any(0)
                values["matched_iou_several_touching" if (near[k] & others).any() else
                       "matched_iou_several_apart"].append(iou)
    return {"weights": str(args.weights), "variant": args.variant, "split": args.split, "images": len(data),
            **{k: {"mean": round(sum(v) / len(v), 3), "n": len(v)} for k, v in sorted(values.items())}}


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("ceiling", "breakdown", "overfit"):
        s = sub.add_parser(name)
        s.add_argument("--split", choices=("train", "val"), default="val")
        s.add_argument("--images", type=int, default=64)
        s.add_argument("--cache", type=Path, default=None, help="default $SAM3LORA_HOME/pretrain-cache")
        if name == "ceiling":
            s.add_argument("--sides", type=int, nargs="+", default=[16, 32, 64])
        elif name == "overfit":
            s.add_argument("--variant", default="tiny-fast", choices=sorted(TINY_VARIANTS))
            s.add_argument("--steps", type=int, default=800)
            s.add_argument("--val-every", type=int, default=50)
            s.add_argument("--budget", type=float, default=840.0, help="seconds of training at most")
            s.add_argument("--lr", type=float, default=1e-3)
            s.add_argument("--reference-boxes", type=float, default=0.2, metavar="SIZE",
                           help="spread the queries' reference boxes (0: transformers' init)")
            s.add_argument("overrides", nargs="*", help="loss./module. overrides, e.g. loss.o2m.enabled=false")
        else:
            s.add_argument("--weights", type=Path, required=True, help="best.safetensors or a preset directory")
            s.add_argument("--variant", default="tiny-fast", choices=sorted(TINY_VARIANTS))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    args.cache = args.cache or sam3lora_home() / "pretrain-cache"
    if args.command == "overfit":
        overfit(args)  # prints its validations
        return
    result = ceiling(args) if args.command == "ceiling" else breakdown(args)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
