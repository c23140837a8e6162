"""The training app: turn the composed config into built objects and run Lightning."""

from __future__ import annotations

from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig

from sam3lora.training.dry_run import dry_run


def run(cfg: DictConfig) -> float | None:
    """Run one job of ``sam3lora-train``; returns ``cfg.optimized_metric`` for sweepers (None for a dry run)."""
    if cfg.dry_run:
        out_dir = HydraConfig.get().runtime.output_dir
        dry_run(cfg.model.name_or_path, instantiate(cfg.lora), out_dir, seed=cfg.model.seed)
        return None
    raise NotImplementedError("training is not wired yet: use dry_run=true")
