"""``sam3lora-export``: merge a LoRA adapter into its base and save a plain transformers directory.

The output loads with ``transformers.Sam3Model.from_pretrained(OUT)`` and ``Sam3Processor.from_pretrained(OUT)``,
no sam3lora or PEFT needed; its ``README.md`` is the adapter's model card, for the merged model (docs/adapters.md).
``--onnx`` adds ``model.onnx`` (+ ``onnx.json`` describing its inputs): a fixed-shape graph for one (image, prompt)
row, traced with PyTorch's TorchScript exporter; it needs the ``onnx`` package (``onnxruntime`` too, to verify the
graph against PyTorch). The folder appears whole when everything succeeded.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from sam3lora.model.load_base import DTYPE_ALIASES


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``sam3lora-export`` argument parser."""
    p = _Parser(
        prog="sam3lora-export",
        description="Merge a LoRA adapter into SAM 3 and save a plain transformers directory (processor included).",
        epilog="example:\n"
        "  sam3lora-export --base tiny --adapter logs/train/runs/X/adapter --out merged --dtype bf16\n\n"
        "--onnx: one (image, prompt) row per run (batch 1, one exemplar-box slot: a zero box with label -10 for\n"
        "text only); other batch sizes and box counts are not supported by the traced graph. Needs\n"
        "pip install 'onnx>=1.16' ('onnxruntime>=1.18' to verify). Verified on the tiny preset on CPU only; for\n"
        "the full model (untested) PyTorch writes weights over 2 GB as external data files beside model.onnx.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--base", default="facebook/sam3", help="base model: facebook/sam3 (default), a local "
                   "transformers directory, or tiny")
    p.add_argument("--adapter", required=True, help="LoRA adapter directory or sam3lora Lightning checkpoint (.ckpt)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPE_ALIASES),
                   help="dtype of the saved weights (default fp32)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--onnx", action="store_true", help="also write model.onnx (see below)")
    return p


def run(args: argparse.Namespace) -> int:
    """Merge and save; returns the exit status."""
    from sam3lora.export import export_merged
    from sam3lora.inference.errors import PredictorError
    from sam3lora.inference.model_with_adapters import load_for_inference
    from sam3lora.io import atomic_dir

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        raise PredictorError(f"{out}: exists and is not empty (use --overwrite to replace it)")
    if args.onnx:
        from sam3lora.inference.onnx_export import check_onnx_available

        check_onnx_available()  # before the (long) load
    # merge in float32; seed: the tiny preset's weights (no --seed option, as sam3lora-predict)
    loaded = load_for_inference(args.base, args.adapter, dtype="float32", merge=False, seed=0)
    if not args.onnx:
        export_merged(
            loaded.model, loaded.processor, out, dtype=DTYPE_ALIASES[args.dtype], overwrite=args.overwrite,
            adapter=args.adapter,
        )
        print(f"wrote {out}: merged {args.adapter} into {args.base} ({args.dtype})")
        return 0

    from transformers import Sam3Model

    from sam3lora.inference.onnx_export import export_onnx, write_onnx_info

    with atomic_dir(out, overwrite=args.overwrite) as tmp:
        export_merged(
            loaded.model, loaded.processor, tmp, dtype=DTYPE_ALIASES[args.dtype], overwrite=True, adapter=args.adapter,
            shared_as=out,
        )
        merged = Sam3Model.from_pretrained(tmp, dtype="float32")  # the saved weights, whatever --dtype
        info = export_onnx(merged, loaded.processor, tmp / "model.onnx")
        write_onnx_info(tmp / "onnx.json", info)
    check = info["verified_max_abs_diff"]
    verified = f"verified with onnxruntime (max abs diff {check:.1e})" if check is not None else (
        "not verified (onnxruntime is not installed)"
    )
    print(f"wrote {out}: merged {args.adapter} into {args.base} ({args.dtype}) + model.onnx, {verified}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``sam3lora-export``; returns the exit status (2 on bad input)."""
    args = build_parser().parse_args(argv)
    from sam3lora.errors import exit_status

    return exit_status("sam3lora-export", run, args)


if __name__ == "__main__":
    sys.exit(main())
