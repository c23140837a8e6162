"""``sam3lora-predict``: segment text and/or exemplar-box prompts on an image, a folder or a glob.

Writes into ``--out`` (the folder appears whole when the run ends)::

    overlays/<image>.png             masks tinted per prompt, boxes and scores
    masks/<image>/<prompt>_<k>.png   one PNG per instance (with --save-masks)
    predictions.json                 COCO: images, categories (one per prompt), annotations = detections with
                                     RLE masks, xywh boxes and scores

An unreadable image (or one that an exemplar box does not fit) is reported by name and skipped. Exit status: 0
all images done, 1 some failed, 2 usage error (one line, no traceback).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

HELP_EPILOG = """examples:
  sam3lora-predict photos/ --text "red circle" --base tiny --out preds
  sam3lora-predict "data/**/*.jpg" --text car --text truck --adapter logs/train/runs/X/adapter --out preds
  sam3lora-predict img.png --box 10,20,80,90 --out preds            # exemplar box only
"""


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors in one line (exit status 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def box_argument(text: str) -> tuple[float, float, float, float]:
    """``--box x1,y1,x2,y2`` (pixels) -> four floats (``parse_box``, with argparse's error)."""
    from sam3lora.inference.errors import PromptError
    from sam3lora.inference.predictor import parse_box

    try:
        return parse_box(text)
    except PromptError as err:
        raise argparse.ArgumentTypeError(f"--{err}") from None


def build_parser() -> argparse.ArgumentParser:
    """The ``sam3lora-predict`` argument parser."""
    p = _Parser(
        prog="sam3lora-predict",
        description="Segment text and/or box prompts with SAM 3 (+ a LoRA adapter).",
        epilog=HELP_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("images", nargs="+", help="image files, folders (their images) or glob patterns (quote them)")
    p.add_argument("--text", action="append", default=[], help="text prompt (repeatable)")
    p.add_argument("--box", action="append", default=[], type=box_argument, metavar="X1,Y1,X2,Y2",
                   help="exemplar box in pixels (repeatable); with --text it refines every text prompt, alone it "
                        "finds objects like the boxed one")
    p.add_argument("--base", default="facebook/sam3", help="base model: facebook/sam3 (default), a local "
                   "transformers directory, or tiny (offline demo preset)")
    p.add_argument("--adapter", help="LoRA adapter directory or sam3lora Lightning checkpoint (.ckpt)")
    p.add_argument("--out", default="predictions", help="output folder (default: predictions)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--save-masks", action="store_true", help="also write one PNG per instance")
    p.add_argument("--threshold", type=float, default=0.5, help="keep instances scoring >= this (default 0.5)")
    p.add_argument("--mask-threshold", type=float, default=0.5, help="mask probability threshold (default 0.5)")
    p.add_argument("--batch-size", type=int, default=4, help="images per forward pass (default 4)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="weights dtype (default fp32)")
    return p


def _unique_stem(path: Path, taken: set[str]) -> str:
    stem, i = path.stem, 2
    while stem in taken:
        stem, i = f"{path.stem}_{i}", i + 1
    taken.add(stem)
    return stem


def _summary(prompts: Sequence[str], detections: Sequence[dict[str, Any]], done: int, failed: int, out: Path):
    from rich.table import Table

    table = Table(title=f"sam3lora-predict: {done} image(s) done, {failed} failed -> {out}")
    for col in ("prompt", "images with instances", "instances", "mean score", "max score"):
        table.add_column(col, justify="left" if col == "prompt" else "right")
    for cid, prompt in enumerate(prompts, start=1):
        dets = [d for d in detections if d["category_id"] == cid]
        scores = [d["score"] for d in dets]
        table.add_row(
            prompt,
            str(len({d["image_id"] for d in dets})),
            str(len(dets)),
            f"{sum(scores) / len(scores):.3f}" if scores else "-",
            f"{max(scores):.3f}" if scores else "-",
        )
    return table


def run(args: argparse.Namespace) -> int:
    """Predict on every image; returns the exit status (0 ok, 1 some images failed)."""
    import torch
    from PIL import Image
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from sam3lora.inference import PredictorError, Sam3LoRAPredictor, make_prompts
    from sam3lora.inference.draw import overlay
    from sam3lora.inference.images import find_images, read_image
    from sam3lora.inference.predictor import check_boxes_inside, prompt_slug
    from sam3lora.inference.records import detection_records, results_document, write_json
    from sam3lora.io import atomic_dir

    paths = find_images(args.images)
    prompts = make_prompts(args.text or None, args.box or None)  # validates before the model loads
    if args.batch_size < 1:
        raise PredictorError(f"--batch-size must be >= 1, got {args.batch_size}")
    for name in ("threshold", "mask_threshold"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise PredictorError(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(args, name)}")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        raise PredictorError(f"{out}: exists and is not empty (use --overwrite to replace it)")
    predictor = Sam3LoRAPredictor.from_pretrained(args.base, args.adapter, device=args.device, dtype=args.dtype)

    err = Console(stderr=True, soft_wrap=True)
    images_meta: list[dict[str, Any]] = []
    detections: list[dict[str, Any]] = []
    failures: list[str] = []
    stems: set[str] = set()
    with atomic_dir(out, overwrite=args.overwrite) as tmp, Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        console=err, transient=True,
    ) as progress:
        task = progress.add_task("predicting", total=len(paths))
        for start in range(0, len(paths), args.batch_size):
            batch: list[tuple[int, Path, Image.Image]] = []
            for image_id, path in enumerate(paths[start : start + args.batch_size], start=start + 1):
                try:
                    image = read_image(path)
                    for prompt in prompts:
                        check_boxes_inside(prompt, (image.height, image.width), str(path))
                    batch.append((image_id, path, image))
                except PredictorError as problem:
                    failures.append(str(problem))
                    progress.console.print(f"error: {problem}", markup=False, highlight=False)
                    progress.advance(task)
            if not batch:
                continue
            with torch.inference_mode():
                results = predictor.predict(
                    [im for _, _, im in batch], text=args.text or None, boxes=args.box or None,
                    threshold=args.threshold, mask_threshold=args.mask_threshold, batch_size=len(batch),
                )
            for (image_id, path, image), per_prompt in zip(batch, results, strict=True):
                stem = _unique_stem(path, stems)
                images_meta.append({"id": image_id, "file_name": str(path), "width": image.width,
                                    "height": image.height, "overlay": f"overlays/{stem}.png"})
                (tmp / "overlays").mkdir(exist_ok=True)
                overlay(image, per_prompt).save(tmp / "overlays" / f"{stem}.png")
                for cid, result in enumerate(per_prompt, start=1):
                    detections.extend(detection_records(result, image_id, cid))
                    if args.save_masks:
                        folder = tmp / "masks" / stem
                        folder.mkdir(parents=True, exist_ok=True)
                        for k, mask in enumerate(result.masks.numpy()):
                            Image.fromarray(mask.astype("uint8") * 255).save(
                                folder / f"{prompt_slug(result.prompt)}_{k:03d}.png"
                            )
                progress.advance(task)
        write_json(tmp / "predictions.json", results_document(images_meta, [p.text for p in prompts], detections))
    Console(soft_wrap=True).print(
        _summary([p.text for p in prompts], detections, len(images_meta), len(failures), out)
    )
    for failure in failures:
        print(f"failed: {failure}", file=sys.stderr)
    return 1 if failures else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``sam3lora-predict``; returns the exit status."""
    args = build_parser().parse_args(argv)
    from sam3lora.errors import exit_status

    return exit_status("sam3lora-predict", run, args)


if __name__ == "__main__":
    sys.exit(main())
