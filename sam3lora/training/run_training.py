"""The training app: turn the composed config into built objects and run Lightning."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import types
import typing
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from sam3lora.errors import Sam3LoRAError
from sam3lora.io import atomic_file
from sam3lora.lora import apply_lora
from sam3lora.model import load_model
from sam3lora.perf import check_deterministic
from sam3lora.training.callbacks import finish_run_cards
from sam3lora.training.checkpoint import use_atomic_checkpoints
from sam3lora.training.dry_run import dry_run

log = logging.getLogger(__name__)
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
TABLE_METRICS = ("val/iou", "val/dice", "val/cgF1", "val/IL_MCC", "val/pmF1", "val/segm_AP", "val/bbox_AP")


class ConfigError(Sam3LoRAError, ValueError):
    """A config value is wrong; the message names the key."""


_SIMPLE = {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "null"}


def _accepts(hint: Any, value: Any) -> bool | None:
    """Whether ``value`` fits ``hint`` when the hint is made of int/float/bool/str/None only; None = not checked."""
    arms = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if not arms or not all(arm in _SIMPLE for arm in arms):
        return None
    for arm in arms:
        if arm is type(None) and value is None:
            return True
        if arm is bool and isinstance(value, bool):
            return True
        if arm is int and isinstance(value, int) and not isinstance(value, bool):
            return True
        if arm is float and isinstance(value, int | float) and not isinstance(value, bool):
            return True
        if arm is str and isinstance(value, str):
            return True
    return False


def _hints(target: Any) -> dict[str, Any]:
    try:
        obj = get_object(target) if isinstance(target, str) else target
        return typing.get_type_hints(obj if dataclasses.is_dataclass(obj) else getattr(obj, "__init__", obj))
    except Exception:  # unresolvable annotations (forward references...): no check
        return {}


def check_types(node: Any, key: str, hints: dict[str, Any] | None = None) -> None:
    """Check each plain value of a config node against its target's type hints (int, float, bool, str and
    optional ones); nested ``_target_`` nodes and dataclass-typed fields are checked too. Raises
    :class:`ConfigError` naming the key, e.g. ``lora.rank: expected an integer, got 'abc'``."""
    if not isinstance(node, DictConfig):
        return
    if hints is None:
        hints = _hints(node.get("_target_")) if "_target_" in node else {}
    for name in node:
        name = str(name)
        if name.startswith("_"):
            continue
        try:
            if OmegaConf.is_missing(node, name):
                continue
            value = node[name]
        except Exception:  # an interpolation that cannot resolve here: instantiate reports it
            continue
        hint = hints.get(name)
        if isinstance(value, DictConfig):
            if "_target_" in value:
                check_types(value, f"{key}.{name}")
            elif isinstance(hint, type) and dataclasses.is_dataclass(hint):
                check_types(value, f"{key}.{name}", _hints(hint))
            continue
        if hint is not None and _accepts(hint, value) is False:
            wanted = " or ".join(_SIMPLE[a] for a in (typing.get_args(hint) or (hint,)))
            raise ConfigError(f"{key}.{name}: expected {wanted}, got {value!r}")


def check_config(cfg: DictConfig) -> None:
    """:func:`check_types` over every group of the composed config, before anything is loaded or built."""
    check_types(cfg.get("model"), "model", _hints(load_model))
    for key in ("lora", "loss", "module", "data", "trainer"):
        check_types(cfg.get(key), key)
    for group in ("callbacks", "logger"):
        for name, node in (cfg.get(group) or {}).items():
            check_types(node, f"{group}.{name}")


def build(node: DictConfig, key: str, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` that names the config key when the node's arguments are wrong (plain values
    are type-checked first, see :func:`check_types`)."""
    check_types(node, key)
    try:
        return instantiate(node, **kwargs)
    except Exception as err:  # Hydra wraps the target's TypeError/ValueError in InstantiationException
        cause = err.__cause__ or err
        message = str(cause)
        raise ConfigError(message if message.startswith(f"{key}.") else f"{key}: {message}") from err


def run_job(cfg: DictConfig, prog: str = "sam3lora-train") -> float | None:
    """:func:`run` as the CLI runs it: a user error (bad config value, data, model, adapter) is printed as one
    line ``<prog>: error: ...`` on stderr and exits with status 2; ``HYDRA_FULL_ERROR=1`` re-raises it instead
    (the full traceback)."""
    from sam3lora.errors import one_line, user_errors

    try:
        return run(cfg)
    except user_errors() as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr, flush=True)
        sys.exit(2)


def run(cfg: DictConfig) -> float | None:
    """Run one job of ``sam3lora-train``; returns ``cfg.optimized_metric`` of the best checkpoint (sweepers)."""
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    check_config(cfg)
    lora = build(cfg.lora, "lora")
    if cfg.dry_run:
        dry_run(cfg.model.name_or_path, lora, out_dir, seed=cfg.model.seed)
        return None
    L.seed_everything(cfg.seed, workers=True)
    model, processor = load_model(**cfg.model)
    module = build(
        cfg.module, "module", model=apply_lora(model, lora), criterion=build(cfg.loss, "loss"), lora_settings=lora
    )
    datamodule = build(cfg.data, "data", processor=processor)
    if module.vision_cache is not None:  # random training transforms: fail now, not after a validation pass
        try:
            check_deterministic(datamodule)
        except ValueError as err:
            raise ConfigError(str(err)) from err
    # callbacks / logger: null (e.g. debug configs) means none; a single entry set to null is left out
    callbacks = [build(node, f"callbacks.{name}") for name, node in (cfg.get("callbacks") or {}).items() if node]
    loggers = [build(node, f"logger.{name}") for name, node in (cfg.get("logger") or {}).items() if node]
    trainer = build(cfg.trainer, "trainer", callbacks=callbacks, logger=loggers or False)
    use_atomic_checkpoints(trainer)
    share_cpu_cores(trainer, datamodule.num_workers)
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    start = None
    if cfg.compare_with_start and cfg.ckpt_path is None:
        start = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    best_path = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    best = trainer.validate(module, datamodule=datamodule, ckpt_path=best_path or None, verbose=False)[0]
    results = {"start": start, "best": best, "best_checkpoint": best_path, "output_dir": str(out_dir),
               "resumed_from": cfg.ckpt_path}
    if trainer.is_global_zero:
        with atomic_file(out_dir / "results.json") as tmp:
            tmp.write_text(json.dumps(results, indent=2))
        finish_run_cards(trainer, results)  # the adapter's README.md gets the final start-vs-best table
        print_results(start, best)
    metric = best.get(cfg.optimized_metric)
    if metric is None:
        raise ConfigError(f"optimized_metric={cfg.optimized_metric!r} was not logged; logged: {sorted(best)}")
    return float(metric)


def share_cpu_cores(trainer: L.Trainer, num_workers: int) -> None:
    """On CPU, leave one core per DataLoader worker: torch's default of one thread per core, beside busy
    workers, oversubscribes small machines (measured on 2 cores: 13 s per epoch with 1 thread, over 3 minutes
    with 2)."""
    if trainer.accelerator.__class__.__name__ != "CPUAccelerator":
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_process = max(1, cores // max(trainer.world_size, 1) - num_workers)
    if per_process < torch.get_num_threads():
        log.info("CPU training: %d torch thread(s) per process beside %d data worker(s)", per_process, num_workers)
        torch.set_num_threads(per_process)


def print_results(start: dict[str, float] | None, best: dict[str, float], console: Console | None = None) -> None:
    """Table of validation metrics: the untrained start beside the best checkpoint."""
    table = Table(title="validation: start vs best checkpoint")
    table.add_column("metric")
    if start is not None:
        table.add_column("start", justify="right")
    table.add_column("best", justify="right")
    for key in TABLE_METRICS:
        if key not in best:
            continue
        row = [key] + ([f"{start.get(key, float('nan')):.4f}"] if start is not None else []) + [f"{best[key]:.4f}"]
        table.add_row(*row)
    (console or Console()).print(table)
