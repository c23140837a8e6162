"""DDP on the CPU (gloo): ``sam3lora-train trainer=ddp trainer.accelerator=cpu trainer.devices=2``.

The CLI runs in a subprocess; Lightning re-launches it for rank 1 (with Hydra's run directory pinned, so both
ranks share one output directory). A probe callback (``RankProbe`` below, imported by the subprocess through
``PYTHONPATH``) writes what each rank did.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from sam3lora.data.synthetic_shapes import write_synthetic

TESTS = Path(__file__).resolve().parent


class RankProbe(L.Callback):
    """Writes ``<dirpath>/rank<N>.json``: world size, steps, image ids trained on, and a hash of the trainable
    weights at the start and the end of training."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)
        self.record: dict[str, Any] = {"steps": [], "images": []}

    @staticmethod
    def weights_hash(pl_module: L.LightningModule) -> str:
        digest = hashlib.sha256()
        for name, param in sorted(pl_module.named_parameters()):
            if param.requires_grad:
                digest.update(name.encode())
                digest.update(param.detach().float().cpu().numpy().tobytes())
        return digest.hexdigest()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.record["start"] = self.weights_hash(pl_module)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        self.record["steps"].append(trainer.global_step)
        self.record["images"] += batch.image_ids.tolist()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        # the torchmetrics states stay per rank; compute() (cached from the epoch end) is their sum over ranks
        self.record["val"] = {k: float(trainer.callback_metrics[k]) for k in ("val/iou", "val/dice", "val/cgF1")}
        self.record["local_pairs"] = float(pl_module.cgf1.il.sum())
        self.record["pairs"] = pl_module.cgf1.compute()["num_pairs"]
        self.record["local_instances"] = float(pl_module.iou_dice.sums[2])
        self.record["instances"] = pl_module.iou_dice.compute()["num_instances"]

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.record.update(
            end=self.weights_hash(pl_module),
            rank=trainer.global_rank,
            world_size=trainer.world_size,
            strategy=type(trainer.strategy).__name__,
            backend=torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
        )
        self.dirpath.mkdir(parents=True, exist_ok=True)
        (self.dirpath / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.record))


@pytest.mark.slow
def test_ddp_on_cpu_trains_on_both_ranks_and_writes_an_adapter(tmp_path: Path) -> None:
    root = write_synthetic(tmp_path / "data", train=6, val=4, size=224, seed=0)
    args = [
        "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "lora=balanced",
        f"data.root={root}", f"paths.root_dir={tmp_path}", "data.num_workers=0", "data.batch_size=2",
        "data.prompts.max_prompts_per_image=3", "trainer.max_epochs=1", "+trainer.limit_train_batches=2",
        "+trainer.limit_val_batches=1", "compare_with_start=false", "~callbacks.plots", "logger=csv",
        f"+callbacks.probe._target_={__name__}.RankProbe", "+callbacks.probe.dirpath=${paths.output_dir}/probe",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore",
               PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-m", "sam3lora.cli.train", *args], capture_output=True, text=True,
                            timeout=400, cwd=tmp_path, env=env)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    (out,) = (tmp_path / "logs" / "train" / "runs").iterdir()  # both ranks wrote into one run directory

    ranks = [json.loads((out / "probe" / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r, record in enumerate(ranks):
        assert (record["rank"], record["world_size"]) == (r, 2)
        assert record["strategy"] == "DDPStrategy" and record["backend"] == "gloo"
        assert record["steps"] == [0, 1]  # two optimiser steps each
    train_ids = {img["id"] for img in json.loads((root / "train" / "annotations.json").read_text())["images"]}
    seen = [set(record["images"]) for record in ranks]
    assert not seen[0] & seen[1] and seen[0] | seen[1] <= train_ids  # the distributed sampler split the images
    assert ranks[0]["start"] == ranks[1]["start"]  # same initial adapters
    assert ranks[0]["end"] == ranks[1]["end"] != ranks[0]["start"]  # trained, and kept in sync by all-reduce
    # validation metrics are reduced over both ranks' pairs (torchmetrics states, dist_reduce_fx="sum")
    assert ranks[0]["val"] == ranks[1]["val"]
    assert ranks[0]["pairs"] == ranks[1]["pairs"] == ranks[0]["local_pairs"] + ranks[1]["local_pairs"]
    assert ranks[0]["instances"] == ranks[0]["local_instances"] + ranks[1]["local_instances"] > 0

    adapter = out / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    assert json.loads((adapter / "sam3lora.json").read_text())["lora"]["rank"] == 16
    results = json.loads((out / "results.json").read_text())  # rank 0 only
    assert "val/iou" in results["best"] and torch.isfinite(torch.tensor(results["best"]["val/loss"]))
    assert (out / "checkpoints" / "best.ckpt").is_file()
