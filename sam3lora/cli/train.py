"""``sam3lora-train``: the Hydra app (``conf/train.yaml``). ``dry_run=true`` prints the LoRA parameter table."""

from __future__ import annotations

import inspect
import re
import sys

import hydra
from omegaconf import DictConfig

from sam3lora.config import CONF_DIR  # add your own directory: --config-dir DIR or hydra.searchpath


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def job(cfg: DictConfig) -> float | None:
    from sam3lora.training.run_training import run_job  # heavy imports after Hydra has parsed the command line

    return run_job(cfg)  # a user error: one line on stderr, exit status 2 (HYDRA_FULL_ERROR=1: the traceback)


def trainer_flags(args: list[str]) -> list[str]:
    """``trainer.<any lightning Trainer argument>=value`` -> ``++trainer.<argument>=value`` (set or add), so a
    Trainer flag that conf/trainer does not list needs no ``+``; every other argument is kept as it is."""
    found = [re.match(r"^trainer\.([A-Za-z_]\w*)=", a) for a in args]
    if not any(found):
        return list(args)
    from lightning.pytorch import Trainer

    known = set(inspect.signature(Trainer.__init__).parameters) - {"self"}
    return [f"++{a}" if m and m.group(1) in known else a for a, m in zip(args, found, strict=True)]


def main() -> None:
    """Entry point of ``sam3lora-train``."""
    sys.argv[1:] = trainer_flags(sys.argv[1:])
    job()


if __name__ == "__main__":
    main()
