"""``sam3lora-eval``: the Hydra app (``conf/eval.yaml``) comparing the base model and LoRA adapters on a COCO split.

Example::

    sam3lora-eval data.root=data/synthetic data.split=val adapters={finetuned:logs/train/runs/X/adapter}

Bad input (a missing adapter, one made for another base, a broken dataset) prints one line and exits with 2.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from sam3lora.config import CONF_DIR  # add your own directory: --config-dir DIR or hydra.searchpath


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="eval")
def main(cfg: DictConfig) -> None:
    from sam3lora.errors import exit_status  # heavy imports after Hydra parsed the command line
    from sam3lora.inference.run_eval import run

    status = exit_status("sam3lora-eval", run, cfg)
    if status:
        sys.exit(status)


if __name__ == "__main__":
    main()
