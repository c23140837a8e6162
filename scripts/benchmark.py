#!/usr/bin/env python
"""Speed and memory of sam3lora: training steps, the data pipeline and prediction (tables + JSON).

Modes:
    train    forward + SAM 3 criterion + backward + AdamW step on random ``Sam3Batch``es (no dataset needed)
    predict  forward + scores + mask thresholding, no gradients
    data     the real ``Sam3DataModule`` pipeline (decode, transforms, rows, collate) on a generated synthetic set
    loss     the SAM 3 criterion alone (matching, every term, backward) on random outputs: ``--mask-loss full,points``
             at any ``--image-size`` without running the model (Q and the mask size follow ``--model``)
    memory   one training step, counting the bytes autograd saves for backward per image and per component
             (``sam3lora.perf.saved_bytes``): vision/text/geometry encoder, DETR encoder/decoder, mask decoder,
             other (glue code of the forward, the DAC mask product) and loss; works the same on any device

Every list option is an axis; the grid is their product, and the first value of each axis is its baseline in
the ratio table (e.g. ``--prompts 1,4`` reports 4 prompts per image against 1). A configuration that runs out of
memory is recorded as ``OOM`` and the run goes on (larger batches of the same configuration are skipped).

Models: ``tiny`` (the offline preset, 224 px) or ``sam3-random`` (``Sam3Model(Sam3Config())`` with random
weights, at ``--image-size``, default 1008). Step time is the median over ``--steps`` steps after ``--warmup``
(with a vision cache, warm-up covers at least one pass over the ``--distinct-batches``: the first epoch).
Peak memory: CUDA max allocated, or the process's peak RSS (``getrusage``; on the CPU each configuration of a grid
runs in a fresh process by default, ``--isolate``, since freed memory would hide the next one's peak); ``Δmem`` is the
peak minus what was in use before the first step (model and data). FLOPs per step come
from ``torch.utils.flop_counter.FlopCounterMode`` (one extra, untimed step; recomputation by activation
checkpointing is not counted), utilisation is against the card's dense bf16 peak (``--peak-tflops`` overrides).

Examples (docs/performance.md has the commands behind each table)::

    python scripts/benchmark.py train --model tiny --presets minimal,balanced,full --prompts 1,4
    python scripts/benchmark.py train --model sam3-random --image-size 336 --presets balanced --prompts 1,4 \\
        --vision-path shared,repeated --steps 3 --warmup 1
    python scripts/benchmark.py data --image-size 1008 --workers 2 --batch-sizes 4
    python scripts/benchmark.py memory --model sam3-random --image-size 336 --batch-sizes 1 --presets balanced \\
        --activation-checkpointing off,vision_encoder,all
    python scripts/benchmark.py train --model sam3-random --image-size 1008 --device cuda --precision bf16-mixed \\
        --presets minimal,balanced,full --batch-sizes 1,2,4,8 --activation-checkpointing off,on --json gpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import itertools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

hf_logging.disable_progress_bar()

#: Dense bf16 tensor-core peaks in TFLOP/s, matched in order against the CUDA device name.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("H800", 989.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("RTX 4090", 165.0),
    ("RTX 3090", 71.0),
)

# axis name -> (CLI option, parser); the grid's order puts the model-building axes first, batch size last
AXES: dict[str, tuple[str, ...]] = {
    "train": ("preset", "base_dtype", "precision", "ckpt", "vision_cache", "text_cache", "compile", "mask_loss", "o2m",
              "path", "text", "prompts", "batch"),
    "predict": ("preset", "base_dtype", "precision", "text_cache", "compile", "merge", "path", "text", "prompts",
                "batch"),
    "data": ("transforms", "workers", "batch"),
    "loss": ("mask_loss", "prompts", "batch"),
    "memory": ("preset", "base_dtype", "precision", "ckpt", "o2m", "mask_loss", "text", "prompts", "batch"),
}
#: memory mode: components of the saved-bytes table (``sam3lora.perf.saved_bytes``) and their column names
SAVED_COLUMNS = (("vision_encoder", "vision"), ("text_encoder", "text"), ("geometry_encoder", "geometry"),
                 ("detr_encoder", "DETR enc"), ("detr_decoder", "DETR dec"), ("mask_decoder", "mask dec"),
                 ("other", "other"), ("loss", "loss"))
MODEL_KEYS = ("preset", "base_dtype")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
console = Console(stderr=False, width=200)


class SkipConfig(Exception):
    """A configuration that cannot run as asked (e.g. a vision cache on an adapted vision encoder)."""


# ----------------------------------------------------------------------------------------------- arguments


def _list(kind: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        return [kind(v.strip()) for v in text.split(",") if v.strip()]

    return parse


def _switch(text: str) -> bool:
    if text in ("on", "true", "1", "yes"):
        return True
    if text in ("off", "false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected on/off, got {text!r}")


def _compile(text: str) -> bool | str:
    """``off`` / ``on`` (``module.perf.compile``: inductor) or a ``torch.compile`` backend name (``aot_eager``)."""
    try:
        return _switch(text)
    except argparse.ArgumentTypeError:
        return text


def _checkpointing(text: str) -> bool | list[str]:
    """``off`` / ``on`` (the encoders, as ``module.perf.activation_checkpointing: true``), ``all``, or components
    joined by ``+`` (``detr_encoder+detr_decoder``)."""
    from sam3lora.perf import CHECKPOINTABLE

    if text in ("all", "heads"):
        return [c for c in CHECKPOINTABLE if text == "all" or c not in ("vision_encoder", "text_encoder")]
    try:
        return _switch(text)
    except argparse.ArgumentTypeError:
        pass
    parts = [p for p in text.split("+") if p]
    unknown = sorted(set(parts) - set(CHECKPOINTABLE))
    if unknown or not parts:
        raise argparse.ArgumentTypeError(f"expected off, on, all, heads or components of {CHECKPOINTABLE} joined by "
                                         f"'+', got {text!r}")
    return [c for c in CHECKPOINTABLE if c in parts]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )
    parser.add_argument("mode", choices=sorted(AXES), nargs="?", help="what to measure (not with --from-json)")
    parser.add_argument("--model", choices=["tiny", "sam3-random"], default="tiny")
    parser.add_argument("--image-size", type=int, default=None,
                        help="input size S (tiny: 224 only; sam3-random: multiple of 14, default 1008; data: 1008)")
    parser.add_argument("--device", default="auto", help="cpu | cuda | auto")
    parser.add_argument("--presets", type=_list(str), default=["minimal", "balanced", "full"],
                        help="LoRA presets (conf/lora/*.yaml)")
    parser.add_argument("--batch-sizes", type=_list(int), default=[2], help="images per batch")
    parser.add_argument("--prompts", type=_list(int), default=[4], help="prompts (rows) per image")
    parser.add_argument("--precision", type=_list(str), default=["fp32"], help="fp32 | bf16-mixed (torch.autocast)")
    parser.add_argument("--base-dtype", type=_list(str), default=["float32"], help="frozen base weights: float32 | "
                        "bfloat16 (adapters stay float32)")
    parser.add_argument("--activation-checkpointing", type=_list(_checkpointing), default=[False],
                        metavar="off,on,...", help="on: vision + text encoder blocks; all; heads (geometry encoder, "
                        "DETR encoder/decoder, mask decoder); or components joined by '+' "
                        "(vision_encoder+detr_decoder)")
    parser.add_argument("--vision-cache", type=_list(str), default=["off"], help="off | memory | disk (train mode; "
                        "presets with a frozen vision encoder only)")
    parser.add_argument("--text-cache", type=_list(_switch), default=[False], metavar="off,on")
    parser.add_argument("--compile", type=_list(_compile), default=[False], metavar="off,on,BACKEND",
                        help="module.perf.compile: torch.compile of the heads and the loss (warm-up steps compile)")
    parser.add_argument("--mask-loss", type=_list(str), default=["full"], help="full | points (loss.mask_loss)")
    parser.add_argument("--o2m", type=_list(_switch), default=[True], metavar="on,off",
                        help="train: one-to-many (DAC) queries and their loss terms (loss.o2m.enabled)")
    parser.add_argument("--vision-path", type=_list(str), default=["shared"],
                        help="shared (one vision pass per image) | repeated (one per row: the naive path)")
    parser.add_argument("--text-path", type=_list(str), default=["distinct"],
                        help="distinct (the text encoder once per distinct prompt of a batch) | rows (once per row)")
    parser.add_argument("--merge", type=_list(_switch), default=[False], metavar="off,on",
                        help="predict: adapters merged into the base weights")
    parser.add_argument("--workers", type=_list(int), default=[2], help="data: DataLoader workers")
    parser.add_argument("--transforms", type=_list(str), default=["train"],
                        help="data: train (random resize + augmentation, conf/data/synthetic.yaml) | val (resize)")
    parser.add_argument("--images", type=int, default=16, help="data: images in the generated synthetic set")
    parser.add_argument("--data-root", type=Path, default=None, help="data: where the synthetic set is (re)used")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (batches) per configuration")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--distinct-batches", type=int, default=2, help="train/predict: random batches cycled")
    parser.add_argument("--distinct-prompts", type=int, default=8, help="train/predict: distinct prompt texts")
    parser.add_argument("--threads", type=int, default=1, help="CPU: torch threads (0 = leave as is)")
    parser.add_argument("--flops", type=_switch, default=True, metavar="on|off", help="count FLOPs per step")
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak for utilisation (default: by GPU name)")
    parser.add_argument("--time-budget", type=float, default=None, help="seconds; later configurations are skipped")
    parser.add_argument("--isolate", choices=["auto", "on", "off"], default="auto",
                        help="run each configuration in a fresh process (auto: on for CPU grids of several "
                        "configurations, where the peak RSS of one would hide the next one's)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--memory-table", type=Path, default=None,
                        help="memory: write the bytes-per-image table of checkpointing auto here (needs "
                        "--activation-checkpointing off,all; sam3lora/perf/memory_table.json is the shipped one)")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the tables as Markdown here")
    parser.add_argument("--from-json", type=_list(Path), default=None,
                        help="render the tables of an earlier run (its JSON; several runs of one mode, comma-"
                        "separated, are shown as one) instead of measuring; with --memory-table: build it from them")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no tables")
    parser.add_argument("--single", default=None, help=argparse.SUPPRESS)  # one configuration (JSON), --isolate child
    args = parser.parse_args(argv)
    _check(parser, args)
    return args


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.from_json is not None:
        return
    if args.mode is None:
        parser.error("a mode (train, predict, data, loss, memory) is required unless --from-json is given")
    if args.image_size is None:
        args.image_size = 224 if args.model == "tiny" and args.mode != "data" else 1008
    if args.model == "tiny" and args.mode not in ("data", "loss") and args.image_size != 224:
        parser.error("--model tiny takes 224 px images; use --model sam3-random for other sizes")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    bad = {
        "--precision": set(args.precision) - {"fp32", "bf16-mixed"},
        "--base-dtype": set(args.base_dtype) - set(DTYPES),
        "--vision-cache": set(args.vision_cache) - {"off", "memory", "disk"},
        "--mask-loss": set(args.mask_loss) - {"full", "points"},
        "--vision-path": set(args.vision_path) - {"shared", "repeated"},
        "--text-path": set(args.text_path) - {"distinct", "rows"},
        "--transforms": set(args.transforms) - {"train", "val"},
        "--presets": {p for p in args.presets if not (ROOT / "conf" / "lora" / f"{p}.yaml").is_file()},
    }
    for option, values in bad.items():
        if values:
            parser.error(f"{option}: unknown value(s) {sorted(values)}")
    if args.isolate == "auto":
        args.isolate = "on" if args.device == "cpu" and args.single is None and len(grid(args)) > 1 else "off"
    args.isolate = args.isolate == "on" and args.single is None
    if min(args.batch_sizes + args.prompts) < 1 or args.steps < 1 or args.warmup < 0 or args.distinct_batches < 1:
        parser.error("batch sizes, prompts, steps and distinct batches must be >= 1, warm-up >= 0")


def axis_values(args: argparse.Namespace) -> dict[str, list[Any]]:
    return {
        "preset": args.presets, "base_dtype": args.base_dtype, "precision": args.precision,
        "ckpt": args.activation_checkpointing, "vision_cache": args.vision_cache, "text_cache": args.text_cache,
        "compile": args.compile,
        "mask_loss": args.mask_loss, "o2m": args.o2m, "path": args.vision_path, "text": args.text_path,
        "prompts": args.prompts,
        "batch": args.batch_sizes,
        "merge": args.merge, "workers": args.workers, "transforms": args.transforms,
    }


def grid(args: argparse.Namespace) -> list[dict[str, Any]]:
    values = axis_values(args)
    axes = AXES[args.mode]
    return [dict(zip(axes, combo, strict=True)) for combo in itertools.product(*(values[a] for a in axes))]


# ----------------------------------------------------------------------------------------------- measuring


def rss_gb() -> float:
    """Current resident set size of this process (GB)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9


def peak_rss_gb(who: int = resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss * 1024 / 1e9  # Linux: kilobytes


def reset_peak(device: torch.device) -> float:
    """Start a peak-memory window; returns the memory in use now (GB)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 1e9
    with contextlib.suppress(OSError):  # resets the RSS high-water mark that getrusage reports
        Path("/proc/self/clear_refs").write_text("5")
    return rss_gb()


def read_peak(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return peak_rss_gb()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def is_oom(err: BaseException) -> bool:
    if isinstance(err, torch.OutOfMemoryError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------- models


class Models:
    """Builds (and keeps one at a time) the module for a (preset, base dtype) pair."""

    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        self.args = args
        self.device = device
        self.key: tuple[Any, ...] | None = None
        self.module: Any = None
        self.criteria: dict[str, Any] = {}

    def criterion(self, mask_loss: str, o2m: bool = True) -> Any:
        from hydra.utils import instantiate

        if (mask_loss, o2m) not in self.criteria:
            cfg = OmegaConf.load(ROOT / "conf" / "loss" / "sam3.yaml")
            cfg.mask_loss = mask_loss
            cfg.o2m.enabled = o2m
            self.criteria[mask_loss, o2m] = instantiate(cfg)
        return self.criteria[mask_loss, o2m]

    def get(self, config: dict[str, Any]) -> Any:
        key = tuple(config[k] for k in MODEL_KEYS)
        if key != self.key:
            self.module = None
            self.key = None
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self.module = self._build(*key)
            self.key = key
        return self.module

    def _build(self, preset: str, base_dtype: str) -> Any:
        from sam3lora.config import defaults
        from sam3lora.lora import apply_lora
        from sam3lora.model import load_model
        from sam3lora.perf.random_inputs import random_sam3

        args = self.args
        if args.model == "tiny":
            model, _ = load_model("tiny", dtype=base_dtype, seed=args.seed)
            model.to(self.device)
        else:
            model, _ = random_sam3(args.image_size, DTYPES[base_dtype], self.device, seed=args.seed)
        lora = defaults(f"lora/{preset}")
        torch.manual_seed(args.seed)
        module = defaults("module/default", model=apply_lora(model, lora), criterion=self.criterion("full"),
                          optimizer={"lr": 1e-5}, lora_settings=lora)
        return module.to(self.device)


def make_batches(module: Any, config: dict[str, Any], args: argparse.Namespace, device: torch.device) -> list[Any]:
    from sam3lora.perf.random_inputs import repeated_image_batch, synthetic_batch

    text = module.base_model.config.text_config
    batches = []
    for k in range(args.distinct_batches):
        batch = synthetic_batch(
            config["batch"], config["prompts"], args.image_size, text.vocab_size,
            distinct_prompts=args.distinct_prompts, first_image_id=k * config["batch"], seed=args.seed + k,
            bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id, device=device,
        )
        if config.get("text") == "rows":
            batch = dataclasses.replace(batch, text_rows=None, text_index=None)
        batches.append(repeated_image_batch(batch) if config["path"] == "repeated" else batch)
    return batches


def configure(module: Any, config: dict[str, Any], args: argparse.Namespace, tmp: Path) -> Any:
    """Apply the configuration's perf switches; returns the recompute-FLOP counter when checkpointing."""
    from sam3lora.config import defaults
    from sam3lora.perf import FeatureCacheError, RecomputeFlops, set_activation_checkpointing

    vision = config.get("vision_cache", "off")
    if vision != "off" and config.get("path") == "repeated":
        raise SkipConfig("vision cache with the repeated-image path")
    compiled = config.get("compile", False)
    settings = defaults(  # conf/module/default.yaml's switches (all off) with this configuration's
        "module/default.perf",
        activation_checkpointing=config.get("ckpt", False),
        cache_vision_features=False if vision == "off" else vision,
        vision_cache_dir=str(tmp / "vision_cache") if vision == "disk" else None,
        cache_text_features=bool(config.get("text_cache", False)),
        compile={"backend": compiled} if isinstance(compiled, str) else compiled,
    )
    try:
        module.configure_perf(settings)
    except FeatureCacheError as err:
        raise SkipConfig(str(err).split(", but")[0]) from None
    if settings.checkpoint_components and args.flops and args.mode != "memory":
        recompute = RecomputeFlops()
        set_activation_checkpointing(module.model, settings.checkpoint_components, checkpoint_fn=recompute)
        return recompute
    return None


def count_flops(step: Callable[[], Any], recompute: Any) -> int:
    """Model FLOPs of one call of ``step`` (checkpoint recomputation excluded)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    if recompute is not None:
        recompute.counter, recompute.flops = counter, 0
    try:
        with counter:
            step()
    finally:
        if recompute is not None:
            recompute.counter = None
    return int(counter.get_total_flops() - (recompute.flops if recompute is not None else 0))


def time_steps(step: Callable[[int], Any], args: argparse.Namespace, device: torch.device,
               warmup: int, flops_step: Callable[[], int] | None) -> dict[str, Any]:
    """Warm-up, one FLOP-counted step, then ``args.steps`` timed steps; step ``i`` uses batch ``i % distinct``.

    Besides wall time, the CPU time of this process per step (``step_cpu_s``): on a CPU shared with other jobs the
    wall time also counts the waits for a core, the CPU time only the work (with ``--threads 1``, about the wall
    time of an idle machine).
    """
    times, cpu_times = [], []
    first_epoch = 0.0
    for i in range(warmup):
        sync(device)
        start = time.perf_counter()
        step(i)
        sync(device)
        if i < args.distinct_batches:
            first_epoch += time.perf_counter() - start
    flops = flops_step() if flops_step is not None else None
    for i in range(warmup, warmup + args.steps):
        sync(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        step(i)
        sync(device)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    return {
        "step_s": statistics.median(times), "step_s_min": min(times), "step_s_max": max(times),
        "step_cpu_s": statistics.median(cpu_times), "step_cpu_s_min": min(cpu_times), "step_cpu_s_max": max(cpu_times),
        "first_epoch_s": first_epoch if warmup >= args.distinct_batches else None, "flops_per_step": flops,
    }


def run_model_config(models: Models, config: dict[str, Any], args: argparse.Namespace, device: torch.device,
                     tmp: Path) -> dict[str, Any]:
    """One train/predict configuration -> measurements."""
    if config.get("vision_cache", "off") != "off" and args.mode != "train":
        raise SkipConfig("vision cache: train mode only")
    module = models.get(config)
    recompute = configure(module, config, args, tmp)
    batches = make_batches(module, config, args, device)
    batch0 = batches[0]
    train = args.mode == "train"
    warmup = args.warmup
    if config.get("vision_cache", "off") != "off":
        warmup = max(warmup, args.distinct_batches)  # the first epoch fills the cache
    before = reset_peak(device)
    losses: list[float] = []
    merged = False
    try:
        if train:
            module.criterion = models.criterion(config["mask_loss"], config["o2m"]).to(device)
            module.train()
            optimizer = torch.optim.AdamW(module.param_groups(), lr=1e-5)

            def step(i: int) -> None:
                batch = batches[i % len(batches)]
                with autocast(config["precision"], device):
                    outputs = module(batch)
                    loss = module.criterion(outputs, batch.targets)["loss"]
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.detach().item())
        else:
            module.eval()
            if config.get("merge"):
                module.model.merge_adapter()
                merged = True

            def step(i: int) -> None:
                batch = batches[i % len(batches)]
                with torch.inference_mode(), autocast(config["precision"], device):
                    outputs = module(batch)
                    scores = outputs["pred_logits"].sigmoid() * outputs["presence_logits"].sigmoid()
                    keep = scores > 0.5
                    masks = outputs["pred_masks"] > 0
                    float(keep.sum() + masks.sum())  # consume the outputs

        flops_step = (lambda: count_flops(lambda: step(0), recompute)) if args.flops else None
        result = time_steps(step, args, device, warmup, flops_step)
        result["peak_gb"] = read_peak(device)
    finally:
        if merged:
            module.model.unmerge_adapter()
        if train:
            module.zero_grad(set_to_none=True)
    rows, images = batch0.num_rows, batch0.num_images
    if config["path"] == "repeated":
        images = config["batch"]  # the same images, each encoded once per row
    result.update(
        rows=rows, images=images, rows_per_s=rows / result["step_s"], images_per_s=images / result["step_s"],
        mem_before_gb=before, step_mem_gb=result["peak_gb"] - before,
        epoch_s=result["step_s"] * args.distinct_batches,
        trainable_params=sum(p.numel() for p in module.parameters() if p.requires_grad),
    )
    if losses:
        result.update(loss_first=losses[0], loss_last=losses[-1], loss_finite=all(map(_finite, losses)))
    if module.vision_cache is not None:
        result["vision_cache_gb"] = module.vision_cache.nbytes() / 1e9
        result["vision_cache_hits"] = module.vision_cache.hits
    if module.text_cache is not None:
        result["text_cache_hits"] = module.text_cache.hits
    return result


def _finite(value: float) -> bool:
    return value == value and abs(value) != float("inf")


def run_memory_config(models: Models, config: dict[str, Any], args: argparse.Namespace, device: torch.device,
                      tmp: Path) -> dict[str, Any]:
    """One training step whose forward and loss count the bytes saved for backward, per component and image."""
    from torch.utils.flop_counter import FlopCounterMode

    from sam3lora.perf.saved_bytes import LOSS, SavedBytes

    module = models.get(config)
    configure(module, config, args, tmp)
    batch = make_batches(module, {**config, "path": "shared"}, args, device)[0]
    module.criterion = models.criterion(config["mask_loss"], config["o2m"]).to(device)
    module.train()
    before = reset_peak(device)
    counter = SavedBytes(module.model)
    flops = FlopCounterMode(display=False) if args.flops else contextlib.nullcontext()
    try:
        sync(device)
        start = time.perf_counter()
        with counter.recording(), autocast(config["precision"], device):
            with flops:  # the forward's FLOPs per component: what checkpointing one costs
                outputs = module(batch)
            with counter.label(LOSS):
                loss = module.criterion(outputs, batch.targets)["loss"]
        report = counter.report(images=batch.num_images, rows=batch.num_rows)
        del outputs
        loss.backward()
        sync(device)
        step_s = time.perf_counter() - start
        peak = read_peak(device)
    finally:
        counter.remove()
        module.zero_grad(set_to_none=True)
    per_image = report.per_image()
    result: dict[str, Any] = {
        "rows": batch.num_rows, "images": batch.num_images, "step_s": step_s, "rows_per_s": batch.num_rows / step_s,
        "texts": batch.num_rows if batch.text_rows is None else len(batch.text_rows),  # the text encoder's inputs
        "images_per_s": batch.num_images / step_s, "peak_gb": peak, "mem_before_gb": before,
        "step_mem_gb": peak - before, "loss": float(loss.detach()),
        "saved_gb_per_image": per_image["total"] / 1e9,
        "saved_gb_per_image_by_component": {k: v / 1e9 for k, v in per_image.items() if k != "total"},
        "checkpoint_input_gb_per_image": {k: v / batch.num_images / 1e9 for k, v in report.checkpoint_inputs.items()},
        "saved_tensors": report.tensors,
    }
    if isinstance(flops, FlopCounterMode):
        result["forward_flops_per_image"] = component_flops(flops, batch.num_images)
    for component, _ in SAVED_COLUMNS:
        result[f"saved_{component}_gb"] = result["saved_gb_per_image_by_component"].get(component, 0.0)
    return result


def component_flops(counter: Any, images: int) -> dict[str, float]:
    """Forward FLOPs per image of each component of ``sam3lora.perf.saved_bytes.COMPONENT_MODULES``."""
    from sam3lora.perf.saved_bytes import COMPONENT_MODULES

    counts = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    out = {}
    for component, paths in COMPONENT_MODULES.items():  # module names end with the base model's attribute path
        total = sum(max((n for name, n in counts.items() if name.endswith(f".model.{path}")), default=0)
                    for path in paths)
        out[component] = total / images
    return out


def run_data_config(config: dict[str, Any], args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """One data-pipeline configuration: batches from ``Sam3DataModule.train_dataloader`` -> rows/s, images/s."""
    from hydra import compose, initialize_config_dir

    from sam3lora.data.datamodule import Sam3DataModule
    from sam3lora.perf.random_inputs import sam3_processor

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        data = OmegaConf.to_container(compose("train", overrides=["data=synthetic"]).data)
    transforms = data["train_transforms"] if config["transforms"] == "train" else data["val_transforms"]
    shipped = {k: v for k, v in data.items() if not k.startswith("_")}
    datamodule = Sam3DataModule(
        sam3_processor(args.image_size), **shipped | dict(
            root=root, image_size=args.image_size, reader=None, train_transforms=transforms, batch_size=config["batch"],
            num_workers=config["workers"], pin_memory=False, persistent_workers=False, seed=args.seed, synthetic=None,
        ),
    )
    datamodule.setup("fit")
    before = reset_peak(torch.device("cpu"))
    loader = datamodule.train_dataloader()

    def batches() -> Iterator[Any]:
        while True:  # epoch after epoch (workers restart at each epoch, as in training)
            yield from loader

    stream = batches()
    for _ in range(args.warmup):
        next(stream)
    times, rows, images = [], 0, 0
    start = time.perf_counter()
    for _ in range(args.steps):
        t0 = time.perf_counter()
        batch = next(stream)
        times.append(time.perf_counter() - t0)
        rows += batch.num_rows
        images += batch.num_images
    total = time.perf_counter() - start
    stream.close()
    gc.collect()
    return {
        "step_s": statistics.median(times), "step_s_min": min(times), "step_s_max": max(times),
        "batches": args.steps, "total_s": total, "rows": rows / args.steps, "images": images / args.steps,
        "epoch_s": total / images * len(datamodule.train_dataset),
        "rows_per_s": rows / total,
        "images_per_s": images / total, "peak_gb": peak_rss_gb(), "mem_before_gb": before,
        "step_mem_gb": peak_rss_gb() - before, "workers_peak_gb": peak_rss_gb(resource.RUSAGE_CHILDREN),
    }


def run_loss_config(models: Models, config: dict[str, Any], args: argparse.Namespace,
                    device: torch.device) -> dict[str, Any]:
    """One criterion configuration: matching + loss terms + backward on random outputs of the model's shapes."""
    from sam3lora.perf.random_inputs import synthetic_batch, synthetic_outputs

    queries = 20 if args.model == "tiny" else 200
    criterion = models.criterion(config["mask_loss"]).to(device)
    batches = [synthetic_batch(config["batch"], config["prompts"], args.image_size, 1000, seed=args.seed + k,
                               first_image_id=k * config["batch"], device=device)
               for k in range(args.distinct_batches)]
    outputs = [synthetic_outputs(b, queries, args.image_size * 2 // 7, seed=args.seed + k)
               for k, b in enumerate(batches)]
    before = reset_peak(device)

    def step(i: int) -> None:
        k = i % len(batches)
        loss = criterion(outputs[k], batches[k].targets)["loss"]
        loss.backward()
        for value in outputs[k].values():
            for t in value if isinstance(value, list) else [value]:
                for leaf in t.values() if isinstance(t, dict) else [t]:
                    leaf.grad = None

    result = time_steps(step, args, device, args.warmup, None)
    rows, images = batches[0].num_rows, batches[0].num_images
    peak = read_peak(device)
    result.update(peak_gb=peak, mem_before_gb=before, step_mem_gb=peak - before, rows=rows, images=images,
                  rows_per_s=rows / result["step_s"], images_per_s=images / result["step_s"],
                  epoch_s=result["step_s"] * args.distinct_batches)
    return result


def synthetic_root(args: argparse.Namespace, tmp: Path) -> Path:
    from sam3lora.data.synthetic_shapes import write_synthetic

    root = args.data_root or tmp / f"synthetic_{args.images}x{args.image_size}"
    if not (root / "train" / "annotations.json").is_file():
        console.print(f"generating {args.images} synthetic {args.image_size} px images into {root}")
        write_synthetic(root, train=args.images, val=1, size=args.image_size, seed=args.seed)
    return root


# ----------------------------------------------------------------------------------------------- the grid


def run_one(config: dict[str, Any], args: argparse.Namespace, device: torch.device, models: Models | None,
            tmp: Path, data_root: Path | None) -> dict[str, Any]:
    """Run one configuration, turning OOM and impossible combinations into a status."""
    record: dict[str, Any] = {**config, "status": "ok"}
    oom = False
    try:
        if args.mode == "data":
            record.update(run_data_config(config, args, data_root))  # type: ignore[arg-type]
        elif args.mode == "loss":
            record.update(run_loss_config(models, config, args, device))  # type: ignore[arg-type]
        elif args.mode == "memory":
            record.update(run_memory_config(models, config, args, device, tmp))  # type: ignore[arg-type]
        else:
            record.update(run_model_config(models, config, args, device, tmp))  # type: ignore[arg-type]
    except SkipConfig as err:
        record["status"] = f"skipped: {err}"
    except (RuntimeError, torch.OutOfMemoryError) as err:
        if not is_oom(err):
            raise
        oom = True
    if oom:  # outside the except block: the traceback (and the tensors it holds) is gone
        record["status"] = "OOM"
        if models is not None and models.module is not None:
            models.module.zero_grad(set_to_none=True)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return record


def run_isolated(config: dict[str, Any], argv: Sequence[str]) -> dict[str, Any]:
    """Run one configuration in a fresh interpreter (clean peak memory, no state from earlier ones)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--single", json.dumps(config), "--quiet",
               "--json", str(out)]
        proc = subprocess.run(cmd, check=False)
        if proc.returncode != 0 or not out.is_file():
            return {**config, "status": f"error: exit code {proc.returncode}"}
        return json.loads(out.read_text())["results"][0]


def _oom_below(record_list: list[dict[str, Any]], config: dict[str, Any]) -> int | None:
    """Batch size of a smaller-batch twin of ``config`` that ran out of memory, if any."""
    for done in record_list:
        if done["status"] == "OOM" and done["batch"] < config["batch"] and all(
            done[k] == v for k, v in config.items() if k != "batch"
        ):
            return int(done["batch"])
    return None


def run_grid(args: argparse.Namespace, argv: Sequence[str]) -> list[dict[str, Any]]:
    device = torch.device(args.device)
    configs = [json.loads(args.single)] if args.single else grid(args)
    records: list[dict[str, Any]] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sam3lora-bench-") as tmp_name:
        tmp = Path(tmp_name)
        data_root = synthetic_root(args, tmp) if args.mode == "data" else None
        if args.data_root is None and data_root is not None and args.isolate:
            args.data_root = data_root  # children reuse the generated set
            argv = [*argv, "--data-root", str(data_root)]
        models = Models(args, device) if args.mode != "data" and not args.isolate else None
        for n, config in enumerate(configs):
            if args.time_budget is not None and time.perf_counter() - started > args.time_budget:
                records.append({**config, "status": "skipped: time budget"})
                continue
            smaller = _oom_below(records, config)
            if smaller is not None:
                records.append({**config, "status": f"OOM (batch {smaller} did)"})
                continue
            if not args.quiet:
                console.print(f"[{n + 1}/{len(configs)}] {config}", style="dim")
            if args.isolate:
                records.append(run_isolated(config, argv))
            else:
                records.append(run_one(config, args, device, models, tmp, data_root))
    return records


# ----------------------------------------------------------------------------------------------- reporting


def add_utilisation(records: list[dict[str, Any]], peak: float | None) -> None:
    for r in records:
        flops = r.get("flops_per_step")
        if r["status"] != "ok" or not flops:
            continue
        r["tflops_per_s"] = flops / r["step_s"] / 1e12
        r["mfu"] = r["tflops_per_s"] / peak if peak else None


def ratios(records: list[dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    """For every axis with several values: each non-baseline configuration against its baseline twin."""
    values = axis_values(args)
    axes = AXES[args.mode]
    ok = [r for r in records if r["status"] == "ok"]
    out = []
    for axis in axes:
        if len(values[axis]) < 2:
            continue
        baseline = values[axis][0]
        for r in ok:
            if r[axis] == baseline:
                continue
            twin = next((b for b in ok if b[axis] == baseline and all(b[a] == r[a] for a in axes if a != axis)), None)
            if twin is None:
                continue
            others = {a: r[a] for a in axes if a != axis and len(values[a]) > 1}
            out.append({
                "axis": axis, "value": r[axis], "baseline": baseline, "config": others,
                "step_time_ratio": r["step_s"] / twin["step_s"],
                "rows_per_s_ratio": r["rows_per_s"] / twin["rows_per_s"],
                "epoch_time_ratio": r.get("epoch_s", r["step_s"]) / twin.get("epoch_s", twin["step_s"]),
                "peak_mem_ratio": r["peak_gb"] / twin["peak_gb"] if twin["peak_gb"] else None,
                "step_mem_ratio": r["step_mem_gb"] / twin["step_mem_gb"] if twin["step_mem_gb"] > 0 else None,
                "saved_ratio": r["saved_gb_per_image"] / twin["saved_gb_per_image"]
                if twin.get("saved_gb_per_image") else None,
            })
    return out


def _fmt(value: Any, spec: str = ".3g") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return _components(value)
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 and spec.endswith("g") else format(value, spec)
    return str(value)


def table_rows(payload: dict[str, Any]) -> tuple[str, list[str], list[list[str]], list[str], list[list[str]]]:
    """(title, result header, result rows, ratio header, ratio rows) as strings, for rich and Markdown alike."""
    meta, records = payload["meta"], payload["results"]
    axes = AXES[meta["mode"]]
    varying = [a for a in axes if len({json.dumps(r.get(a)) for r in records}) > 1 or a in ("preset", "batch")]
    title = (f"{meta['mode']} | {meta['model']} {meta['image_size']} px | {meta['device_name']} | "
             f"threads {meta['threads']} | load {meta['load_start']} -> {meta.get('load_end', '?')}")
    cols = [("rows", "rows", ".3g"), ("step ms", "step_ms", ".4g"), ("rows/s", "rows_per_s", ".3g"),
            ("img/s", "images_per_s", ".3g"), ("peak GB", "peak_gb", ".2f"), ("Δmem GB", "step_mem_gb", ".2f")]
    if meta["mode"] == "data":
        cols += [("workers peak GB", "workers_peak_gb", ".2f")]
    elif meta["mode"] == "memory":  # saved-for-backward GB per image, per component
        cols = [("rows", "rows", ".3g"), ("step ms", "step_ms", ".4g"), ("peak GB", "peak_gb", ".2f"),
                ("Δmem GB", "step_mem_gb", ".2f"),
                *((name, f"saved_{key}_gb", ".3f") for key, name in SAVED_COLUMNS),
                ("saved GB/img", "saved_gb_per_image", ".3f")]
    elif meta["mode"] != "loss":
        cols += [("TFLOP/step", "tflop_per_step", ".3g"), ("TFLOP/s", "tflops_per_s", ".3g"), ("MFU", "mfu", ".1%")]
    header = [*varying, *(name for name, _, _ in cols), "status"]
    rows = []
    for r in records:
        r2 = dict(r)
        if r.get("step_s") is not None:
            r2["step_ms"] = r["step_s"] * 1e3
        if r.get("flops_per_step"):
            r2["tflop_per_step"] = r["flops_per_step"] / 1e12
        rows.append([*(_fmt(r.get(a)) for a in varying), *(_fmt(r2.get(k), spec) for _, k, spec in cols), r["status"]])
    ratio_header = ["axis", "value vs baseline", "other settings", "step time", "epoch time", "rows/s", "peak mem",
                    "Δmem"]
    keys = ["step_time_ratio", "epoch_time_ratio", "rows_per_s_ratio", "peak_mem_ratio", "step_mem_ratio"]
    if meta["mode"] == "memory":
        ratio_header.append("saved/img")
        keys.append("saved_ratio")
    ratio_rows = [
        [q["axis"], f"{_fmt(q['value'])} vs {_fmt(q['baseline'])}",
         " ".join(f"{k}={_fmt(v)}" for k, v in q["config"].items()),
         *(_fmt(q.get(k), ".2f") for k in keys)]
        for q in payload["ratios"]
    ]
    return title, header, rows, ratio_header, ratio_rows


def print_tables(payload: dict[str, Any]) -> None:
    title, header, rows, ratio_header, ratio_rows = table_rows(payload)
    table = Table(title=title)
    for i, name in enumerate(header):
        numeric = all(_numeric(row[i]) for row in rows)
        table.add_column(name, justify="right" if numeric else "left")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    if ratio_rows:
        rt = Table(title="ratios against each axis's first value (same other settings)")
        for i, name in enumerate(ratio_header):
            rt.add_column(name, justify="right" if i >= 3 else "left")
        for row in ratio_rows:
            rt.add_row(*row)
        console.print(rt)


def markdown(payload: dict[str, Any]) -> str:
    """The result and ratio tables as Markdown, with the command that made them."""
    title, header, rows, ratio_header, ratio_rows = table_rows(payload)

    def md(head: list[str], body: list[list[str]]) -> list[str]:
        align = ["---:" if all(_numeric(r[i]) for r in body) else "---" for i in range(len(head))]
        return ["| " + " | ".join(head) + " |", "| " + " | ".join(align) + " |",
                *("| " + " | ".join(r) + " |" for r in body)]

    lines = [f"`{payload['meta']['command']}`", "", f"*{title}*", "", *md(header, rows)]
    if ratio_rows:
        lines += ["", "Ratios (each axis's first value is the baseline; other settings equal):", "",
                  *md(ratio_header, ratio_rows)]
    return "\n".join(lines) + "\n"


def _components(names: list[str]) -> str:
    """Checkpointed components, short: ``all``, ``heads`` or e.g. ``vision+DETR dec``."""
    from sam3lora.perf import CHECKPOINTABLE, ENCODERS

    if names == list(CHECKPOINTABLE):
        return "all"
    if names == [c for c in CHECKPOINTABLE if c not in ENCODERS]:
        return "heads"
    short = dict(SAVED_COLUMNS)
    return "+".join(short.get(n, n) for n in names)


def _numeric(text: str) -> bool:
    return text == "-" or text.replace(",", "").replace(".", "", 1).replace("%", "").replace("e", "").replace(
        "-", "").replace("+", "").isdigit()


def metadata(args: argparse.Namespace, argv: Sequence[str]) -> dict[str, Any]:
    import transformers

    device = torch.device(args.device)
    return {
        "mode": args.mode, "model": args.model if args.mode != "data" else "-", "image_size": args.image_size,
        "device": args.device,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "steps": args.steps, "warmup": args.warmup,
        "distinct_batches": args.distinct_batches, "peak_tflops": peak_tflops(device, args.peak_tflops),
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        "command": "python scripts/benchmark.py " + " ".join(argv),
        "load_start": _load(), "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _load() -> str:
    return "/".join(f"{v:.1f}" for v in os.getloadavg())


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.from_json is not None:
        payload = combine([json.loads(path.read_text()) for path in args.from_json])
        print_tables(payload)
        if args.markdown is not None:
            args.markdown.write_text(markdown(payload))
        if args.memory_table is not None:
            write_memory_table(payload, args.memory_table)
        return payload
    if args.device == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    meta = metadata(args, argv)
    started = time.perf_counter()
    records = run_grid(args, argv)
    meta["load_end"] = _load()
    meta["wall_s"] = time.perf_counter() - started
    add_utilisation(records, meta["peak_tflops"])
    payload = {"meta": meta, "results": records, "ratios": ratios(records, args)}
    if not args.quiet:
        print_tables(payload)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2, default=str))
        if not args.quiet:
            console.print(f"wrote {args.json}")
    if args.markdown is not None and args.single is None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(markdown(payload))
    if args.memory_table is not None and args.single is None:
        write_memory_table(payload, args.memory_table)
    return payload


def combine(payloads: list[dict[str, Any]]) -> dict[str, Any]:
    """Several runs as one: the first run's metadata (the others' commands added), every run's results."""
    first = payloads[0]
    if len(payloads) == 1:
        return first
    meta = {**first["meta"], "command": " && ".join(p["meta"]["command"] for p in payloads)}
    return {"meta": meta, "results": [r for p in payloads for r in p["results"]],
            "ratios": [q for p in payloads for q in p["ratios"]]}


def write_memory_table(payload: dict[str, Any], path: Path) -> None:
    """The ``checkpointing: auto`` table (``sam3lora.perf.memory_plan``) from a memory run's records."""
    from sam3lora.io import write_whole
    from sam3lora.perf.memory_plan import table_from_records

    meta = payload["meta"]
    source = f"{meta['command']} ({meta['model']}, {meta['device_name']}, {meta['time']})"
    table = table_from_records(payload["results"], meta["image_size"], source)
    write_whole(path, json.dumps(table.as_dict(), indent=1, sort_keys=True) + "\n")
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
