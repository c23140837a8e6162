"""The ``sam3lora-eval`` app: base (zero-shot) and adapters side by side on one COCO split.

Writes into ``paths.output_dir`` (the Hydra run folder): ``metrics.md`` (the table), ``metrics.json``,
``metrics.png`` (bar chart) and ``detections/<model>.json`` (COCO results each model's AP was computed on).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from sam3lora.data.readers import CocoReader
from sam3lora.inference.errors import PredictorError
from sam3lora.inference.evaluate import EvalSettings, evaluate
from sam3lora.inference.model_with_adapters import adapter_name_for
from sam3lora.inference.predictor import Sam3LoRAPredictor
from sam3lora.inference.report import bar_chart, markdown_table, write_json
from sam3lora.io import write_whole
from sam3lora.metrics import write_coco_results

BASE_NAME = "base"


def adapter_sources(adapters: Any) -> dict[str, str]:
    """``adapters`` config (null, a path, a list of paths, or ``{name: path}``) -> ``{name: path}``."""
    if adapters is None:
        return {}
    if isinstance(adapters, (DictConfig, ListConfig)):
        adapters = OmegaConf.to_container(adapters, resolve=True)
    if isinstance(adapters, str):
        adapters = [adapters]
    if isinstance(adapters, Mapping):
        sources = {str(k): str(v) for k, v in adapters.items()}
    elif isinstance(adapters, Sequence):
        sources = {}
        for path in adapters:
            sources[adapter_name_for(str(path), set(sources) | {BASE_NAME})] = str(path)
    else:
        raise PredictorError(f"adapters must be a path, a list of paths or {{name: path}}, got {adapters!r}")
    if BASE_NAME in sources:
        raise PredictorError(f"adapters: the name {BASE_NAME!r} is reserved for the base model; rename that adapter")
    for name, path in sources.items():
        if not Path(path).exists():
            raise PredictorError(f"adapters.{name}: {path}: no such adapter directory or checkpoint")
    return sources


def run(cfg: DictConfig, console: Console | None = None) -> dict[str, Any]:
    """Evaluate every model of ``cfg``; returns the ``metrics.json`` content."""
    console = console or Console(soft_wrap=True)
    out_dir = Path(cfg.paths.output_dir)
    settings = EvalSettings(
        score_threshold=cfg.score_threshold,
        mask_threshold=cfg.mask_threshold,
        max_detections=cfg.max_detections,
        batch_size=cfg.batch_size,
        limit=cfg.limit,
    )
    sources = adapter_sources(cfg.adapters)
    models: dict[str, str | None] = ({BASE_NAME: None} if cfg.include_base else {}) | dict(sources)
    if not models:
        raise PredictorError("nothing to evaluate: include_base=false and no adapters given")
    reader = CocoReader(cfg.data.root, cfg.data.split)  # DataError naming the file on a bad split
    predictor = Sam3LoRAPredictor.from_pretrained(
        cfg.model.name_or_path,
        sources or None,
        device=cfg.device,
        dtype=cfg.model.dtype,
        merge=False,
        seed=cfg.model.seed,
        image_size=cfg.model.image_size,
    )
    n_images = len(reader.images()) if settings.limit is None else min(settings.limit, len(reader.images()))
    results: dict[str, dict[str, float]] = {}
    report: dict[str, Any] = {
        "data": {
            "root": str(cfg.data.root), "split": cfg.data.split, "images": n_images,
            "categories": {str(k): v[0] for k, v in reader.categories().items()},
        },
        "base": cfg.model.name_or_path,
        "settings": asdict(settings) | {"device": cfg.device, "dtype": cfg.model.dtype},
        "models": {},
    }
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        console=console, transient=True,
    ) as progress:
        for name, source in models.items():
            task = progress.add_task(f"evaluating {name}", total=n_images)
            result = evaluate(
                predictor, reader, None if source is None else name, settings,
                on_image=lambda _rec, task=task: progress.advance(task),
            )
            detections = out_dir / "detections" / f"{name}.json"
            write_coco_results(detections, result.detections)
            results[name] = result.metrics
            report["models"][name] = {
                "adapter": source, "metrics": result.metrics, "detections": str(detections.relative_to(out_dir)),
            }
    title = f"{cfg.data.root} / {cfg.data.split}: {n_images} images, {len(reader.categories())} categories"
    table = markdown_table(results, title)
    write_whole(out_dir / "metrics.md", table)
    write_json(out_dir / "metrics.json", report)
    bar_chart(results, out_dir / "metrics.png", title)
    console.print(table, markup=False, highlight=False)
    console.print(f"wrote {out_dir / 'metrics.md'}, metrics.json, metrics.png and detections/ (one file per model)")
    return report
