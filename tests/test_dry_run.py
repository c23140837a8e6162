"""Dry-run report: the three presets on the full-size architecture (meta device, no download)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from sam3lora.training.dry_run import lora_summary

CONF = str(Path(__file__).resolve().parents[1] / "conf")
# the budgets the presets answer (SAM3-LoRA's summary): trainable parameters, in millions
BUDGETS = {"minimal": 0.5, "balanced": 4.0, "full": 15.0}


@pytest.mark.parametrize("preset", sorted(BUDGETS))
def test_presets_on_full_size_sam3_land_near_their_budgets(preset):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", overrides=["model=sam3", f"lora={preset}", "dry_run=true"])
    summary = lora_summary(cfg.model.name_or_path, instantiate(cfg.lora), cfg.model.seed)
    total = summary["components"][-1]
    assert total["total"] - total["trainable"] == 840_376_374  # the released architecture, untouched
    millions = total["trainable"] / 1e6
    assert 0.8 * BUDGETS[preset] <= millions <= 1.2 * BUDGETS[preset]
    frozen = {r["component"] for r in summary["components"] if r["trainable"] == 0}
    assert "text_encoder" in frozen or preset == "full"


def test_cli_dry_run_writes_lora_summary(tmp_path):
    cmd = [sys.executable, "-m", "sam3lora.cli.train", "model=sam3", "lora=minimal", "dry_run=true",
           f"paths.root_dir={tmp_path}"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "LoRA parameters" in result.stdout and "detr_decoder" in result.stdout
    (summary_path,) = tmp_path.glob("logs/train/runs/*/lora_summary.json")
    summary = json.loads(summary_path.read_text())
    assert summary["adapted_modules"] == {"detr_encoder": 48, "detr_decoder": 72, "mask_decoder": 4}


def test_cli_unknown_key_is_an_error_naming_it(tmp_path):
    cmd = [sys.executable, "-m", "sam3lora.cli.train", "dry_run=true", "lora.rnak=3", f"paths.root_dir={tmp_path}"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "rnak" in result.stderr
