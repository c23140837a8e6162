"""``sam3lora-demo``: serve a Gradio page that shows the base SAM 3 and LoRA adapters side by side.

With no ``--adapter`` and no ``--base`` it serves the newest training run's adapter (``logs/train/runs/*/adapter``,
what ``make train`` writes) on the base that run used, or the ``tiny`` base alone when there is no run. Needs the
``demo`` extra (``pip install 'sam3lora[demo]'``). Exit status: 0 after Ctrl+C, 2 usage or loading error (one
line, no traceback).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from sam3lora.cli.predict import _Parser

HELP_EPILOG = """examples:
  sam3lora-demo                                   # newest run's adapter of `make train` on its base (CPU)
  sam3lora-demo --base tiny                       # the tiny base alone
  sam3lora-demo --adapter a=runs/A/adapter --adapter b=runs/B/checkpoints/best.ckpt
  sam3lora-demo --base facebook/sam3 --adapter my-adapter --device cuda
  sam3lora-demo --host 0.0.0.0 --port 8080        # reachable from other machines (no authentication!)
"""
_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
TINY_THRESHOLD = 0.2  # the tiny presets' scores stay low: a lower start shows their masks


def parse_adapter(text: str) -> tuple[str | None, str]:
    """``"name=PATH"`` -> ``(name, PATH)``; ``"PATH"`` -> ``(None, PATH)`` (a name is letters, digits, _ or -)."""
    name, sep, path = text.partition("=")
    if sep and _NAME.match(name) and path:
        return name, path
    if sep and not path:
        raise argparse.ArgumentTypeError(f"--adapter {text!r}: no path after '='")
    return None, text


def build_parser() -> argparse.ArgumentParser:
    """The ``sam3lora-demo`` argument parser."""
    p = _Parser(
        prog="sam3lora-demo",
        description="Compare the base SAM 3 and LoRA adapters on your images in the browser (Gradio).",
        epilog=HELP_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--base", help="base model: tiny, tiny-pretrained, facebook/sam3 or a local transformers "
                   "directory (default: the base the adapter was trained on, else tiny)")
    p.add_argument("--adapter", action="append", default=[], type=parse_adapter, metavar="[NAME=]PATH",
                   help="LoRA adapter directory or sam3lora .ckpt (repeatable; NAME labels it in the page)")
    p.add_argument("--runs", default="logs/train/runs",
                   help="where to find the newest run when neither --adapter nor --base is given "
                        "(default: logs/train/runs)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="weights dtype (default fp32)")
    p.add_argument("--seed", type=int, help="weight seed of the tiny preset (default: the run's, else 0)")
    p.add_argument("--examples", help="folder of example images (default: a few generated synthetic shapes)")
    p.add_argument("--max-image-side", type=int, default=2048, help="refuse images larger than this (px, "
                   "default 2048)")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="refuse files larger than this (MB, default 20)")
    p.add_argument("--threshold", type=float, help="initial score threshold (default 0.5; 0.2 on the tiny presets, "
                   "whose scores stay low)")
    p.add_argument("--mask-threshold", type=float, default=0.5, help="initial mask threshold (default 0.5)")
    return p


@dataclass
class Plan:
    """What to load: ``base`` (+ tiny ``seed``), ``adapters`` ``{name: path}``, descriptions per model label and
    notes to print."""

    base: str
    seed: int
    adapters: dict[str, str] = field(default_factory=dict)
    descriptions: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def plan_models(args: argparse.Namespace) -> Plan:
    """Resolve ``--base``/``--adapter`` (or the newest run) into a ``Plan``; raises ``PredictorError``."""
    from sam3lora.demo.runs import base_of, newest_adapter
    from sam3lora.demo.service import BASE
    from sam3lora.inference.errors import PredictorError
    from sam3lora.inference.model_with_adapters import adapter_name_for

    adapters: dict[str, str] = {}
    notes: list[str] = []
    taken = {BASE}
    for name, path in args.adapter:
        if name == BASE:
            raise PredictorError(f"--adapter {name}={path}: the name {BASE!r} is reserved for the base model")
        if name in adapters:
            raise PredictorError(f"--adapter {name}={path}: the name {name!r} is used twice")
        name = name or adapter_name_for(path, taken | set(adapters))
        adapters[name] = path
    if not adapters and args.base is None:
        newest = newest_adapter(args.runs)
        if newest is None:
            notes.append(f"no trained adapter under {args.runs}: showing the base model alone (run `make train` "
                         "first to compare it with a fine-tuned adapter)")
        else:
            adapters["finetuned"] = str(newest)
            notes.append(f"adapter 'finetuned' = {newest} (the newest run under {args.runs})")
    detected = next((b for b in map(base_of, adapters.values()) if b is not None), None)
    base = args.base or (detected.name if detected else "tiny")
    seed = args.seed if args.seed is not None else (detected.seed if detected and base == detected.name else 0)
    if args.base is None and detected:
        notes.append(f"base {base} (seed {seed}) as recorded in {detected.source}")
    described = f"{base}, seed {seed}" if base.startswith("tiny") else base
    return Plan(base, seed, adapters, {BASE: described, **adapters}, notes)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def run(args: argparse.Namespace) -> int:
    """Load the models, build the page and serve it until interrupted."""
    from sam3lora.demo.examples import folder_examples, synthetic_examples
    from sam3lora.demo.page import build_app, launch
    from sam3lora.demo.runs import synthetic_categories_of
    from sam3lora.demo.service import DemoService, UploadLimits
    from sam3lora.inference import PredictorError, Sam3LoRAPredictor

    if args.max_image_side < 32 or args.max_upload_mb <= 0:
        raise PredictorError("--max-image-side must be >= 32 and --max-upload-mb > 0")
    plan = plan_models(args)
    threshold = args.threshold
    if threshold is None:
        threshold = TINY_THRESHOLD if plan.base.startswith("tiny") else 0.5
    if not (0 <= threshold <= 1 and 0 < args.mask_threshold < 1):
        raise PredictorError("--threshold must be in [0, 1] and --mask-threshold in (0, 1)")
    for note in plan.notes:
        print(f"sam3lora-demo: {note}", flush=True)
    if args.examples:
        examples = folder_examples(args.examples)
    else:  # shapes of the categories the (first) adapter's run was trained on, if it was a synthetic run
        trained_on = next(filter(None, map(synthetic_categories_of, plan.adapters.values())), None)
        examples = synthetic_examples(categories=trained_on)
    print(f"sam3lora-demo: loading {plan.base} with {len(plan.adapters)} adapter(s) on {args.device} ...", flush=True)
    predictor = Sam3LoRAPredictor.from_pretrained(
        plan.base, plan.adapters or None, device=args.device, dtype=args.dtype, merge=False, seed=plan.seed
    )
    limits = UploadLimits(args.max_image_side, args.max_upload_mb)
    print(f"sam3lora-demo: models loaded on {predictor.device}", flush=True)
    app = build_app(DemoService(predictor), examples, limits, threshold, args.mask_threshold, plan.descriptions)
    if not _is_loopback(args.host):
        print(f"sam3lora-demo: warning: serving on {args.host}: anyone who can reach this machine can use the "
              "demo (there is no authentication)", file=sys.stderr)
    try:
        url = launch(app, args.host, args.port, limits, block=False, quiet=True)
    except OSError as err:  # port taken, address not available
        raise PredictorError(f"cannot serve on {args.host}:{args.port} (choose another --port): {err}") from None
    print(f"sam3lora-demo: serving on {url} (Ctrl+C stops)", flush=True)
    app.block_thread()  # until Ctrl+C; then closes the server
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``sam3lora-demo``; returns the exit status."""
    args = build_parser().parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio  # noqa: F401
    except ImportError:
        print("sam3lora-demo: error: Gradio is not installed: pip install 'sam3lora[demo]'", file=sys.stderr)
        return 2
    from sam3lora.errors import exit_status

    try:
        return exit_status("sam3lora-demo", run, args)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
