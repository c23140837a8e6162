"""Callbacks: the best adapter in PEFT format, and plots (loss curves, predictions vs ground truth)."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import matplotlib
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

from sam3lora.adapter import SIDECAR, save_adapter
from sam3lora.io import atomic_file, write_whole
from sam3lora.model_card import CARD, adapter_card, portable_path, run_facts, val_metrics
from sam3lora.sam3 import sam3_scores

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

log = logging.getLogger(__name__)


class BestAdapterExport(L.Callback):
    """Save the adapter (PEFT format + ``sam3lora.json``) to ``dirpath`` whenever ``monitor`` improves.

    ``dirpath`` then always holds the best adapter so far, loadable with ``peft.PeftModel.from_pretrained``;
    ``dirpath/../best_adapter.json`` records the epoch, step and score it came from.

    The callback's checkpoint state holds the best score, that record and the best trainable weights (the
    adapter's own size), so a run resumed into another directory (``ckpt_path=`` under Hydra's new run
    directory) writes the best adapter there before training on, and only a better score replaces it.
    """

    def __init__(self, dirpath: str, monitor: str, mode: str) -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"callbacks.best_adapter.mode must be 'max' or 'min', got {mode!r}")
        self.dirpath = Path(dirpath)
        self.monitor = monitor
        self.mode = mode
        self.best: float | None = None
        self.record: dict[str, Any] | None = None
        self.weights: dict[str, torch.Tensor] | None = None
        self._restored = False

    @property
    def record_path(self) -> Path:
        return self.dirpath.parent / "best_adapter.json"

    def _improved(self, value: float) -> bool:
        if self.best is None or math.isnan(self.best):
            return not math.isnan(value)
        return value > self.best if self.mode == "max" else value < self.best

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        if self.monitor not in trainer.callback_metrics:
            raise KeyError(f"callbacks.best_adapter.monitor={self.monitor!r} was not logged; logged: "
                           f"{sorted(trainer.callback_metrics)}")
        value = float(trainer.callback_metrics[self.monitor])
        if not self._improved(value):
            return
        self.best = value
        self.record = {"monitor": self.monitor, "score": value, "epoch": trainer.current_epoch,
                       "global_step": trainer.global_step}
        self.weights = {n: p.detach().to("cpu", copy=True) for n, p in pl_module.named_parameters() if p.requires_grad}
        if trainer.is_global_zero:
            self._write(pl_module)

    def _write(self, pl_module: L.LightningModule) -> None:
        run = run_facts(pl_module.trainer, self.record or {}, self.mode)  # for the model card (README.md)
        save_adapter(pl_module.model, self.dirpath, settings=getattr(pl_module, "lora_settings", None), run=run)
        with atomic_file(self.record_path) as tmp:
            tmp.write_text(json.dumps(self.record, indent=2))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """After a resume: write the restored best adapter into ``dirpath`` unless it already holds it."""
        if not self._restored:
            return
        self._restored = False
        if not trainer.is_global_zero:
            return
        if self.record is None or self.weights is None:
            if self.best is not None and not (self.dirpath / "adapter_config.json").is_file():
                log.warning("the checkpoint resumed from holds no best adapter weights (written before they were "
                            "kept): %s will hold the best adapter of the resumed epochs", self.dirpath)
                self.best = None
            return
        written = json.loads(self.record_path.read_text()) if self.record_path.is_file() else None
        if written == self.record and (self.dirpath / "adapter_config.json").is_file():
            return  # resumed in the same directory
        params = dict(pl_module.named_parameters())
        missing = sorted(set(self.weights) - set(params))
        if missing:
            raise KeyError(f"the checkpoint's best adapter has weights this model lacks, e.g. {missing[:3]}")
        current = {n: params[n].detach().clone() for n in self.weights}
        with torch.no_grad():
            for name, value in self.weights.items():
                params[name].copy_(value)
            try:
                self._write(pl_module)
            finally:
                for name, value in current.items():
                    params[name].copy_(value)

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "record": self.record, "weights": self.weights}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best = state_dict.get("best")
        self.record = state_dict.get("record")
        self.weights = state_dict.get("weights")
        self._restored = True


class EpochSummary(L.Callback):
    """Print one line of validation metrics after every validation epoch (``keys`` in that order, if logged)."""

    def __init__(self, keys: list[str]) -> None:
        self.keys = list(keys)

    @rank_zero_only
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        parts = [f"{k} {float(metrics[k]):.4f}" for k in self.keys if k in metrics]
        where = f"epoch {trainer.current_epoch}" if trainer.state.fn == "fit" else trainer.state.fn.value
        print(f"[{where}] " + "  ".join(parts), flush=True)


_PALETTE = np.array([[230, 25, 75], [60, 180, 75], [0, 130, 200], [245, 130, 48], [145, 30, 180],
                     [70, 240, 240], [240, 50, 230], [210, 245, 60]], dtype=np.float32) / 255.0


def _overlay(image: np.ndarray, masks: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend (N,H,W) bool masks over an (H,W,3) float image in [0,1], one colour per instance."""
    out = image.copy()
    for i, mask in enumerate(masks):
        colour = _PALETTE[i % len(_PALETTE)]
        out[mask] = (1 - alpha) * out[mask] + alpha * colour
    return out


def save_figure(figure: plt.Figure, path: Path, dpi: int = 80) -> None:
    """Save a matplotlib figure as PNG, whole or not at all."""
    with atomic_file(path) as tmp:
        figure.savefig(tmp, dpi=dpi, format="png")


class TrainingPlots(L.Callback):
    """Plots written under ``dirpath`` (and to TensorBoard when it is a logger).

    - ``curves.png`` at the end of fitting: every logged training loss term per step and every validation
      metric per epoch.
    - ``val_epoch{N}.png`` each validation epoch: up to ``max_images`` rows of the first validation batch,
      ground truth beside predictions (scores >= the module's ``score_threshold``).
    """

    def __init__(self, dirpath: str, max_images: int) -> None:
        self.dirpath = Path(dirpath)
        self.max_images = max_images
        self.train_history: dict[str, list[tuple[int, float]]] = {}
        self.val_history: dict[str, list[tuple[int, float]]] = {}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        for key, value in trainer.callback_metrics.items():
            if key.startswith("train/") and "_aux" not in key:
                self.train_history.setdefault(key, []).append((trainer.global_step, float(value)))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        for key, value in trainer.callback_metrics.items():
            if key.startswith("val/"):
                self.val_history.setdefault(key, []).append((trainer.current_epoch, float(value)))

    @rank_zero_only
    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if batch_idx != 0 or trainer.sanity_checking or not isinstance(outputs, dict):
            return
        figure = self.prediction_grid(trainer, pl_module, batch, outputs)
        if trainer.state.fn == "fit":
            name = f"val_epoch{trainer.current_epoch:03d}"
        else:  # a validate() call outside fit: before training (step 0) or of the best checkpoint
            name = f"val_{trainer.state.fn.value}_step{trainer.global_step}"
        save_figure(figure, self.dirpath / f"{name}.png")
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_figure("val/predictions", figure, global_step=trainer.global_step)
        plt.close(figure)

    def prediction_grid(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, outputs: dict) -> Any:
        processor = trainer.datamodule.processor
        mean = torch.tensor(processor.image_processor.image_mean).view(3, 1, 1)
        std = torch.tensor(processor.image_processor.image_std).view(3, 1, 1)
        threshold = pl_module.metric_settings.score_threshold
        scores = sam3_scores(outputs["pred_logits"], outputs["presence_logits"]).float().cpu()
        size = batch.pixel_values.shape[-2:]
        positive = [r for r, t in enumerate(batch.targets) if len(t["boxes"])]
        negative = [r for r, t in enumerate(batch.targets) if not len(t["boxes"])]
        rows = (positive + negative)[: self.max_images]
        figure, axes = plt.subplots(len(rows), 2, figsize=(6, 3 * len(rows)), squeeze=False)
        for ax_row, r in zip(axes, rows, strict=True):
            pixels = batch.pixel_values[batch.image_index[r]].float().cpu() * std + mean
            image = pixels.clamp(0, 1).permute(1, 2, 0).numpy()
            keep = torch.nonzero(scores[r] >= threshold).flatten()
            logits = outputs["pred_masks"][r, keep.to(outputs["pred_masks"].device)].float()
            pred = torch.zeros((0, *size), dtype=torch.bool)
            if len(keep):
                pred = torch.nn.functional.interpolate(logits[None], size=size, mode="bilinear")[0] > 0
            gt = batch.targets[r]["masks"].bool().cpu().numpy()
            ax_row[0].imshow(_overlay(image, gt))
            ax_row[0].set_title(f"GT: {batch.prompts[r]!r} ({len(gt)})", fontsize=8)
            ax_row[1].imshow(_overlay(image, pred.cpu().numpy()))
            best = f", best {scores[r].max():.2f}" if scores.shape[1] else ""
            ax_row[1].set_title(f"pred ({len(keep)} >= {threshold}{best})", fontsize=8)
            for ax in ax_row:
                ax.axis("off")
        figure.tight_layout()
        return figure

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        histories = [("training (per step)", self.train_history), ("validation (per epoch)", self.val_history)]
        keys = [(title, k, h[k]) for title, h in histories for k in sorted(h)]
        if not keys:
            return
        cols = 4
        n_rows = math.ceil(len(keys) / cols)
        figure, axes = plt.subplots(n_rows, cols, figsize=(4 * cols, 2.6 * n_rows), squeeze=False)
        for ax, (title, key, points) in zip(axes.flat, keys, strict=False):
            x, y = zip(*points, strict=True)
            ax.plot(x, y, marker="." if len(x) < 50 else None)
            ax.set_title(key, fontsize=9)
            ax.set_xlabel("step" if title.startswith("training") else "epoch", fontsize=8)
            ax.tick_params(labelsize=7)
        for ax in list(axes.flat)[len(keys):]:
            ax.axis("off")
        figure.tight_layout()
        save_figure(figure, self.dirpath / "curves.png")
        plt.close(figure)


def finish_run_cards(trainer: Any, results: Mapping[str, Any]) -> list[Path]:
    """Rewrite the card and ``sam3lora.json`` of every adapter a ``BestAdapterExport`` of ``trainer`` wrote, with
    the run's final numbers (``results``: ``start`` and ``best`` validation metrics, as in ``results.json``)."""
    written = []
    checkpoint_cb = getattr(trainer, "checkpoint_callback", None)
    for callback in trainer.callbacks:
        if not isinstance(callback, BestAdapterExport) or not (callback.dirpath / SIDECAR).is_file():
            continue
        sidecar = json.loads((callback.dirpath / SIDECAR).read_text())
        run = dict(sidecar.get("run") or {})
        evaluation = dict(run.get("evaluation") or {"monitor": callback.monitor, "mode": callback.mode})
        evaluation["start"] = val_metrics(results.get("start"))
        # results["best"] validates the best checkpoint; it is this adapter when both follow the same metric
        if checkpoint_cb is not None and getattr(checkpoint_cb, "monitor", None) == callback.monitor:
            evaluation["best"] = val_metrics(results.get("best")) or evaluation.get("best")
        evaluation["final"] = True
        run["evaluation"] = evaluation
        training = dict(run.get("training") or {})
        training.update(epochs_trained=trainer.current_epoch, steps_trained=trainer.global_step)
        run["training"] = training
        sidecar["run"] = run
        text = adapter_card(trainer.lightning_module.model, sidecar, portable_path(callback.dirpath))
        write_whole(callback.dirpath / SIDECAR, json.dumps(sidecar, indent=2, default=str))
        written.append(write_whole(callback.dirpath / CARD, text))
    return written
