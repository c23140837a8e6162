"""``sam3lora-data``: synthetic demo sets, COCO/YOLO conversion, validation and statistics.

Subcommands::

    sam3lora-data synthetic --out DIR [--train N --val M --size PX --seed S --categories "red circle,..."]
                            [--overwrite]
    sam3lora-data convert --from {yolo,coco} --src DIR --out DIR [--prompts FILE] [--overwrite]
    sam3lora-data validate DIR [--from {auto,coco,yolo}]   # any layout convert reads; exit 1 on errors
    sam3lora-data stats DIR [--png FILE]

User errors print one line ``error: <file>: <problem>`` and exit 2; data that ``convert`` refuses prints one line
per problem (``error: <split>: <file> [id N]: <problem>``), then ``error: <src>: <summary>``, and exits 2 with
nothing written. Data warnings print ``warning: ...``. ``convert --overwrite`` replaces only a directory sam3lora
wrote (it holds ``.sam3lora-converted`` or ``.sam3lora-synthetic``).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence

from rich.console import Console

from sam3lora.data.data_error import DataError, DataWarning


def _synthetic(args: argparse.Namespace) -> int:
    from sam3lora.data.synthetic_shapes import write_synthetic

    cats = [c.strip() for c in args.categories.split(",")] if args.categories else None
    out = write_synthetic(args.out, train=args.train, val=args.val, size=args.size, seed=args.seed,
                          categories=cats, overwrite=args.overwrite, hard_negatives=args.hard_negatives)
    print(f"wrote {out} ({args.train} train + {args.val} val images, {args.size} px)")
    return 0


def _convert(args: argparse.Namespace) -> int:
    if args.source_format == "yolo":
        from sam3lora.data.yolo import yolo_to_coco

        if args.prompts:
            raise DataError(args.prompts, "--prompts is only supported with --from coco")
        out = yolo_to_coco(args.src, args.out, overwrite=args.overwrite)
    else:
        from sam3lora.data.coco_convert import normalise_coco

        out = normalise_coco(args.src, args.out, prompts=args.prompts, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0


def _validate(args: argparse.Namespace) -> int:
    from sam3lora.data.validate import print_report
    from sam3lora.data.validate_dataset import validate_dataset

    report = validate_dataset(args.dir, args.source_format)
    print_report(report, Console(soft_wrap=True))
    return 0 if report.ok else 1


def _stats(args: argparse.Namespace) -> int:
    from sam3lora.data.stats import dataset_stats, print_stats, write_examples_png

    print_stats(dataset_stats(args.dir), Console(soft_wrap=True))
    if args.png:
        print(f"wrote {write_examples_png(args.dir, args.png)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``sam3lora-data`` argument parser."""
    p = argparse.ArgumentParser(prog="sam3lora-data", description="Dataset tools for sam3lora.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("synthetic", help="write a synthetic coloured-shapes dataset")
    s.add_argument("--out", required=True, help="output dataset directory")
    s.add_argument("--train", type=int, default=64, help="train images (default 64)")
    s.add_argument("--val", type=int, default=16, help="val images (default 16)")
    s.add_argument("--size", type=int, default=224, help="image side in pixels (default 224)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--categories", help='comma-separated "<colour> <shape>" names, e.g. "red circle,blue square"')
    s.add_argument("--hard-negatives", type=float, default=0.5,
                   help="probability of unannotated colour/shape mixes in an image (default 0.5; 0 = none)")
    s.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    s.set_defaults(func=_synthetic)

    c = sub.add_parser("convert", help="convert a YOLO or COCO dataset to the sam3lora layout")
    c.add_argument("--from", dest="source_format", required=True, choices=("yolo", "coco"))
    c.add_argument("--src", required=True, help="source dataset directory (YOLO: folder with data.yaml)")
    c.add_argument("--out", required=True, help="output dataset directory")
    c.add_argument("--prompts", help="prompts.yaml: category name -> prompt or list of prompts (coco only)")
    c.add_argument("--overwrite", action="store_true",
                   help="replace an --out written by an earlier convert (never any other directory)")
    c.set_defaults(func=_convert)

    v = sub.add_parser("validate", help="check a dataset in any layout convert reads; exit 1 on errors")
    v.add_argument("dir", help="converted set, Roboflow or classic COCO export, or YOLO folder (data.yaml)")
    v.add_argument("--from", dest="source_format", default="auto", choices=("auto", "coco", "yolo"),
                   help="dataset format (default: COCO json files if any, else data.yaml)")
    v.set_defaults(func=_validate)

    t = sub.add_parser("stats", help="per-category statistics; --png draws example images with masks")
    t.add_argument("dir")
    t.add_argument("--png", help="write a grid of example images with their masks to this PNG")
    t.set_defaults(func=_stats)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (0 ok, 1 validation errors, 2 user error)."""
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DataWarning)
        try:
            code = args.func(args)
        except DataError as e:
            issues = getattr(e, "issues", None)
            if issues is not None:  # DatasetProblems: one line per problem, then the verdict
                for issue in issues:
                    print(f"error: {issue}", file=sys.stderr)
                print(f"error: {e.path}: {getattr(e, 'summary', e.problem)}", file=sys.stderr)
            else:
                print(f"error: {e.path}: {e.problem}", file=sys.stderr)
            code = 2
        finally:
            for w in caught:
                if issubclass(w.category, DataWarning):
                    print(f"warning: {w.message}", file=sys.stderr)
                else:
                    warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    return code


if __name__ == "__main__":
    sys.exit(main())
