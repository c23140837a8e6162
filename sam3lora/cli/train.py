"""``sam3lora-train``: the Hydra app (``conf/train.yaml``). ``dry_run=true`` prints the LoRA parameter table."""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")  # the repository's conf/ (editable install)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    from sam3lora.training.app import run  # heavy imports after Hydra has parsed the command line

    return run(cfg)


if __name__ == "__main__":
    main()
