"""``sam3lora-eval``: the Hydra app (``conf/eval.yaml``) comparing the base model and LoRA adapters on a COCO split.

Example::

    sam3lora-eval data.root=data/synthetic data.split=val adapters={finetuned:logs/train/runs/X/adapter}

Bad input (a missing adapter, one made for another base, a broken dataset) prints one line and exits with 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")  # the repository's conf/ (editable install)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="eval")
def main(cfg: DictConfig) -> None:
    from sam3lora.inference.errors import exit_status  # heavy imports after Hydra parsed the command line
    from sam3lora.inference.eval_app import run

    status = exit_status("sam3lora-eval", run, cfg)
    if status:
        sys.exit(status)


if __name__ == "__main__":
    main()
