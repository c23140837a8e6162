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
    from sam3lora.inference.errors import one_line, user_errors  # heavy imports after Hydra parsed the command line

    errors = user_errors()
    try:
        from sam3lora.inference.eval_app import run

        run(cfg)
    except errors as err:
        print(f"sam3lora-eval: error: {one_line(err)}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
