"""``sam3lora-train``: the Hydra app (``conf/train.yaml``). ``dry_run=true`` prints the LoRA parameter table."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

# conf/ of the repository, shipped in the wheel as the package sam3lora.conf (editable installs map it onto conf/);
# add your own config directory with --config-dir DIR or hydra.searchpath=[file://DIR]
CONF_DIR = "pkg://sam3lora.conf"


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    from sam3lora.training.app import run_job  # heavy imports after Hydra has parsed the command line

    return run_job(cfg)  # a user error: one line on stderr, exit status 2 (HYDRA_FULL_ERROR=1: the traceback)


if __name__ == "__main__":
    main()
