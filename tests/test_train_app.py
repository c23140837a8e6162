"""The training app (``sam3lora-train``, ``conf/train.yaml``) end to end, the lightning-hydra-template way.

In process: the real config is composed with ``hydra.compose`` and Hydra's runtime is set as ``@hydra.main`` sets
it, then ``sam3lora.training.run_training.run`` runs one job. Where Hydra's own machinery is under test (multirun, the
Optuna sweeper) the CLI runs in a subprocess. Every run is small: the tiny preset, 6 train / 4 val synthetic
images, 2 images per batch, 2 training and 1 validation batch per epoch, on the CPU with one torch thread (the
tensors are small; two threads on a busy 2-core machine are many times slower than one).
"""

from __future__ import annotations

import csv
import inspect
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig, OmegaConf, open_dict

from sam3lora.model import load_model
from sam3lora.training.run_training import ConfigError, build, run

pytestmark = pytest.mark.usefixtures("one_thread")
CONF = Path(__file__).resolve().parents[1] / "conf"
SMALL = [
    "data.num_workers=0",
    "data.batch_size=2",
    "data.prompts.max_prompts_per_image=3",
    "trainer.max_epochs=1",
    "+trainer.limit_train_batches=2",
    "+trainer.limit_val_batches=1",
    "trainer.accelerator=cpu",
]
# no start-vs-best validation, no COCO AP, no plots, no loggers: the parts under test and nothing else
LEAN = ["compare_with_start=false", "module.metrics.ap_every_n_epochs=0", "~callbacks.plots", "~callbacks.lr_monitor",
        "~logger"]


@pytest.fixture(autouse=True)
def hydra_runtime() -> Iterator[None]:
    """Forget the Hydra runtime a test set up."""
    yield
    HydraConfig.instance().cfg = None


def compose_cfg(root: Path, tmp_path: Path, *overrides: str, hydra: bool = False) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(
            "train",
            overrides=[f"data.root={root}", f"paths.root_dir={tmp_path}", *overrides],
            return_hydra_config=hydra,
        )


def job_cfg(root: Path, tmp_path: Path, *overrides: str, name: str = "job") -> DictConfig:
    """The config of one job, as ``@hydra.main`` hands it to the app: runtime set, ``hydra`` node removed."""
    cfg = compose_cfg(root, tmp_path, *overrides, hydra=True)
    out = tmp_path / name
    out.mkdir(parents=True, exist_ok=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(out)
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def add_callbacks(cfg: DictConfig, **nodes: dict[str, Any]) -> DictConfig:
    with open_dict(cfg):
        if cfg.get("callbacks") is None:
            cfg.callbacks = {}
        for key, node in nodes.items():
            cfg.callbacks[key] = node
    return cfg


def output_dir() -> Path:
    return Path(HydraConfig.get().runtime.output_dir)


def run_cli(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "sam3lora.cli.train", *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)
    assert result.returncode == 0, f"{' '.join(args)}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


# ------------------------------------------------------------------------------------------ probes (callbacks)


class Probe(L.Callback):
    """Records (epoch, global step, lr, image ids) of every training batch under ``tag``.

    ``reseed``: seed torch's global generator from the epoch at each epoch start. Lightning does not checkpoint
    the global RNG, and the DETR layers use dropout, so a resumed run is compared with an uninterrupted one
    with the dropout stream made a function of the epoch in both.
    """

    records: ClassVar[dict[str, list[tuple[int, int, float, list[int]]]]] = {}

    def __init__(self, tag: str, reseed: bool = True) -> None:
        self.tag = tag
        self.reseed = reseed
        Probe.records[tag] = []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.reseed:
            torch.manual_seed(1000 + trainer.current_epoch)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        Probe.records[self.tag].append((trainer.current_epoch, trainer.global_step, lr, batch.image_ids.tolist()))


class StopAfterEpoch(L.Callback):
    """Stop fitting at the end of epoch ``epoch`` (after its validation and checkpoint): an interrupted run."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


class DtypeProbe(L.Callback):
    """Records the dtype of the per-layer query logits computed in training steps."""

    seen: ClassVar[list[torch.dtype]] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        DtypeProbe.seen.clear()
        scoring = pl_module.base_model.dot_product_scoring
        scoring.register_forward_hook(lambda _m, _a, out: DtypeProbe.seen.append(out.dtype))


def probe(tag: str, reseed: bool = True) -> dict[str, Any]:
    return {"_target_": f"{__name__}.Probe", "tag": tag, "reseed": reseed}


# Lightning >= 2.5 rewrites last.ckpt (save_last: true) only when a top-k checkpoint is saved in the same step, so
# with conf/callbacks/default.yaml last.ckpt stays at the best epoch whenever the metric does not improve. The
# fix, until the default config carries it: a second ModelCheckpoint without a monitor keeps the latest epoch.
LATEST_CHECKPOINT = {
    "_target_": "lightning.pytorch.callbacks.ModelCheckpoint",
    "dirpath": "${paths.output_dir}/checkpoints",
    "filename": "last",
    "monitor": None,
    "save_top_k": 1,
    "enable_version_counter": False,
}


def keep_latest_checkpoint(cfg: DictConfig) -> DictConfig:
    with open_dict(cfg):
        cfg.callbacks.model_checkpoint.save_last = False
    return add_callbacks(cfg, last_checkpoint=LATEST_CHECKPOINT)


# ------------------------------------------------------------------------------------------ fast_dev_run


@pytest.mark.parametrize(
    "overrides",
    [["lora=minimal"], ["lora=balanced"], ["lora=full"], ["experiment=example"]],
    ids=["minimal", "balanced", "full", "experiment-example"],
)
def test_fast_dev_run_of_the_composed_config(synthetic_root: Path, tmp_path: Path, overrides: list[str]) -> None:
    cfg = job_cfg(synthetic_root, tmp_path, "debug=fdr", *SMALL[:3], *overrides)
    assert cfg.trainer.fast_dev_run is True and cfg.task_name == "debug"
    metric = run(cfg)
    assert metric is not None and 0.0 <= metric <= 1.0
    results = json.loads((output_dir() / "results.json").read_text())
    assert torch.isfinite(torch.tensor(results["best"]["val/loss"]))
    assert results["best"][cfg.optimized_metric] == pytest.approx(metric)
    assert results["start"] is None  # debug skips the start validation
    leftovers = {p.name for p in output_dir().iterdir()}
    assert leftovers == {"results.json"}, leftovers  # debug: no checkpoints, adapter, plots or logs


# ------------------------------------------------------------------------------------------ config groups


def overlay_files() -> list[Path]:
    return sorted((CONF / "debug").glob("*.yaml")) + sorted((CONF / "experiment").glob("*.yaml"))


def leaf_keys(node: Any, prefix: str = "") -> set[str]:
    if isinstance(node, dict):
        return set().union(*(leaf_keys(v, f"{prefix}{k}.") for k, v in node.items())) if node else {prefix[:-1]}
    return {prefix[:-1]}


def lookup(node: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


@pytest.mark.parametrize("path", overlay_files(), ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_overlays_set_only_keys_the_code_reads(synthetic_root: Path, tmp_path: Path, path: Path) -> None:
    """Every key an overlay sets already exists in the composed config (so its target takes it), or is an
    argument of ``lightning.pytorch.Trainer``: nothing in these files is silently ignored."""
    group = path.parent.name
    defaults = yaml.safe_load(path.read_text()).get("defaults", [])
    switches = [f"{k.split()[1].lstrip('/')}={v}" for d in defaults if isinstance(d, dict) for k, v in d.items()]
    base = OmegaConf.to_container(compose_cfg(synthetic_root, tmp_path, *switches))
    full = OmegaConf.to_container(compose_cfg(synthetic_root, tmp_path, f"{group}={path.stem}"))
    trainer_args = set(inspect.signature(L.Trainer).parameters)
    new = leaf_keys(full) - leaf_keys(base)
    # a whole node switched off (callbacks: null) or replaced by another one (${data.val_transforms})
    replaced = {
        k for k in new
        if isinstance(lookup(base, k), dict) and (lookup(full, k) is None or str(lookup(full, k)).startswith("${"))
    }
    unknown = {k for k in new - replaced if not (k.startswith("trainer.") and k.split(".")[1] in trainer_args)}
    assert not unknown, f"{path.name} sets keys nothing reads: {sorted(unknown)}"


@pytest.mark.parametrize("name", ["default", "fdr", "overfit", "limit", "profiler"])
def test_debug_configs_build_the_trainer_they_describe(synthetic_root: Path, tmp_path: Path, name: str) -> None:
    from lightning.pytorch.profilers import SimpleProfiler

    cfg = job_cfg(synthetic_root, tmp_path, f"debug={name}")
    assert cfg.task_name == "debug" and cfg.get("callbacks") is None and cfg.get("logger") is None
    assert cfg.data.num_workers == 0 and cfg.data.persistent_workers is False
    trainer = build(cfg.trainer, "trainer", callbacks=[], logger=False)
    assert trainer.num_devices == 1 and not trainer.checkpoint_callback
    expected = {
        "default": lambda t: t.max_epochs == 1 and t.num_sanity_val_steps == 2,
        "fdr": lambda t: t.fast_dev_run is True,
        "overfit": lambda t: t.overfit_batches == 3 and t.max_epochs == 20,
        "limit": lambda t: t.limit_train_batches == 4 and t.limit_val_batches == 2 and t.max_epochs == 3,
        "profiler": lambda t: isinstance(t.profiler, SimpleProfiler) and t.limit_train_batches == 20,
    }
    assert expected[name](trainer)
    if name == "overfit":  # no training randomness, and validation on the images being memorised
        data = OmegaConf.to_container(cfg.data, resolve=True)
        assert data["train_transforms"] == data["val_transforms"] and data["val_split"] == data["train_split"]


def test_experiment_coco_finetune_needs_a_root_and_builds(synthetic_root: Path, tmp_path: Path) -> None:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.root_dir={tmp_path}", "experiment=coco_finetune"])
    assert OmegaConf.is_missing(cfg.data, "root")  # the user must name their dataset
    assert cfg.model.name_or_path == "facebook/sam3" and cfg.data._target_.endswith("Sam3DataModule")
    assert cfg.data.reader._target_.endswith("CocoReader")
    lora = build(cfg.lora, "lora")
    assert lora.rank == 16 and lora.vision_encoder.enabled and not lora.text_encoder.enabled  # balanced
    criterion = build(cfg.loss, "loss")
    assert criterion.mask_loss == "points"
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
    callbacks = [build(node, f"callbacks.{key}") for key, node in cfg.callbacks.items()]
    assert any(type(c).__name__ == "EarlyStopping" and c.patience == 4 for c in callbacks)
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "bf16-mixed"
    with open_dict(cfg):
        cfg.trainer.accelerator = "cpu"  # no GPU here: every other trainer key is still checked
    trainer = build(cfg.trainer, "trainer", callbacks=callbacks, logger=False)
    assert trainer.accumulate_grad_batches == 4 and trainer.gradient_clip_val == 0.1


# ------------------------------------------------------------------------------------------ bad values


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("++lora.variant=bogus", "lora.variant"),
        ("module.scheduler.name=bogus", "module.scheduler.name"),
        ("data.prompts.mode=bogus", "data.prompts.mode"),
        ("data.prompts.max_exemplars=abc", "data.prompts.max_exemplars"),
        ("module.optimizer.lr=abc", "module.optimizer"),
        ("++module.component_lr={vision_encodr:1.0e-4}", "module.component_lr"),
        ("model.dtype=float8", "model.dtype"),
        ("trainer.precision=bogus", "trainer"),
        ("data=coco", "data.root"),
    ],
)
def test_bad_config_value_is_a_clear_error_naming_the_key(
    synthetic_root: Path, tmp_path: Path, override: str, key: str
) -> None:
    overrides = [*SMALL, override]
    cfg = job_cfg(synthetic_root, tmp_path, *overrides)
    if override.startswith("data=coco"):
        with open_dict(cfg):
            cfg.data.root = "???"  # a COCO dataset the user forgot to name
    with pytest.raises((ConfigError, ValueError)) as info:
        run(cfg)
    assert key in str(info.value), str(info.value)
    assert "Traceback" not in str(info.value)


def test_unknown_key_is_refused_at_composition(synthetic_root: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigCompositionException) as info:
        compose_cfg(synthetic_root, tmp_path, "lora.rnak=1")
    assert "lora.rnak" in str(info.value)


# ------------------------------------------------------------------------------------------ bf16 on the CPU


def test_bf16_mixed_precision_runs_on_cpu(synthetic_root: Path, tmp_path: Path) -> None:
    cfg = job_cfg(synthetic_root, tmp_path, "debug=fdr", *SMALL[:3], "trainer.precision=bf16-mixed")
    add_callbacks(cfg, dtype={"_target_": f"{__name__}.DtypeProbe"})
    metric = run(cfg)
    assert metric is not None
    assert torch.bfloat16 in DtypeProbe.seen  # autocast really ran the step in bfloat16
    results = json.loads((output_dir() / "results.json").read_text())
    assert torch.isfinite(torch.tensor(results["best"]["val/loss"]))


# ------------------------------------------------------------------------------------------ resume


@pytest.mark.slow
def test_resume_continues_optimizer_schedule_and_epoch_exactly(synthetic_root: Path, tmp_path: Path) -> None:
    """A (3 epochs, stopped after 2) resumed from last.ckpt as B equals the uninterrupted C, step for step."""
    common = [*SMALL, *LEAN, "trainer.max_epochs=3", "module.scheduler.warmup_steps=2", "lora=minimal"]

    def job(name: str, *extra: str, stop: bool = False) -> dict:
        cfg = keep_latest_checkpoint(job_cfg(synthetic_root, tmp_path, *common, *extra, name=name))
        add_callbacks(cfg, probe=probe(name))
        if stop:
            add_callbacks(cfg, stop={"_target_": f"{__name__}.StopAfterEpoch", "epoch": 1})
        run(cfg)
        return torch.load(output_dir() / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)

    a = job("A", stop=True)
    assert (a["epoch"], a["global_step"]) == (1, 4)
    b = job("B", f"ckpt_path={tmp_path / 'A' / 'checkpoints' / 'last.ckpt'}")
    c = job("C")
    rec = Probe.records
    assert [r[:2] for r in rec["B"]] == [(2, 4), (2, 5)]  # only the third epoch ran, from step 4
    assert rec["A"] == rec["C"][:4]
    assert rec["B"] == rec["C"][4:]  # same learning rates and the same images, in the same order
    lrs = [r[2] for r in rec["C"]]
    assert len(set(lrs)) == len(lrs)  # warm-up then cosine: every step has its own lr, so a reset would show
    assert (b["epoch"], b["global_step"]) == (c["epoch"], c["global_step"]) == (2, 6)
    assert b["state_dict"].keys() == c["state_dict"].keys()
    for key, value in c["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][key], value, msg=key)
    state_b, state_c = b["optimizer_states"][0]["state"], c["optimizer_states"][0]["state"]
    assert state_b.keys() == state_c.keys()
    for index, slots in state_c.items():
        for slot, value in slots.items():
            torch.testing.assert_close(state_b[index][slot], value, msg=f"optimizer state {index}.{slot}")
    assert float(state_b[0]["step"]) == 6  # Adam's step counter continued from 4
    sched_b, sched_c = b["lr_schedulers"][0], c["lr_schedulers"][0]
    assert sched_b["last_epoch"] == sched_c["last_epoch"] == 6
    assert sched_b["_last_lr"] == pytest.approx(sched_c["_last_lr"])
    assert b["Sam3DataModule"] == c["Sam3DataModule"]


def test_default_last_checkpoint_is_the_latest_epoch(synthetic_root: Path, tmp_path: Path) -> None:
    cfg = job_cfg(synthetic_root, tmp_path, *SMALL, *LEAN, "trainer.max_epochs=2", "lora=minimal")
    run(cfg)  # the random tiny base scores val/iou = 0 in both epochs: epoch 1 does not improve on epoch 0
    last = torch.load(output_dir() / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert (last["epoch"], last["global_step"]) == (1, 4)


# ------------------------------------------------------------------------------------------ outputs


@pytest.mark.slow
def test_outputs_of_a_short_full_run(synthetic_root: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = job_cfg(synthetic_root, tmp_path, *SMALL, "lora=minimal", "trainer.log_every_n_steps=1")
    run(cfg)
    out = output_dir()
    # checkpoints: best and last, trainable weights only (small)
    best_ckpt = torch.load(out / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)
    assert (out / "checkpoints" / "last.ckpt").is_file()
    state = best_ckpt["state_dict"]
    assert state and all("lora_" in k for k in state) and set(state) == set(best_ckpt["sam3lora"]["trainable"])
    base, _ = load_model(**cfg.model)
    full_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    assert (out / "checkpoints" / "best.ckpt").stat().st_size < full_bytes / 5
    assert best_ckpt["hyper_parameters"]["lora_settings"]["rank"] == 8  # the LoRA settings travel in the checkpoint
    # adapter/: PEFT format that plain peft loads, holding the best checkpoint's weights
    sidecar = json.loads((out / "adapter" / "sam3lora.json").read_text())
    assert sidecar["lora"]["rank"] == 8 and sidecar["base"]["weights"] is not None
    peft_model = PeftModel.from_pretrained(base, out / "adapter")
    loaded = dict(peft_model.named_parameters())
    for key, value in state.items():
        torch.testing.assert_close(loaded[key.removeprefix("model.")].detach(), value, msg=key)
    assert json.loads((out / "best_adapter.json").read_text())["monitor"] == cfg.optimized_metric
    # plots
    for name in ("curves.png", "val_epoch000.png"):
        with Image.open(out / "plots" / name) as image:
            assert image.size[0] > 100 and image.size[1] > 100
    # results.json: the untrained start and the best checkpoint
    results = json.loads((out / "results.json").read_text())
    assert results["best_checkpoint"] == str(out / "checkpoints" / "best.ckpt")
    for key in ("val/iou", "val/dice", "val/cgF1", "val/loss", "val/bbox_AP", "val/segm_AP"):
        assert key in results["start"] and key in results["best"], key
    # tensorboard: losses per step, metrics per epoch, learning rate, prediction figures
    assert len({p.parent for p in (out / "tensorboard").rglob("events.out.tfevents.*")}) == 1  # one run
    tags = set()
    for path in (out / "tensorboard").rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(path))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"]) | set(acc.Tags()["images"])
    assert {"train/loss", "train/loss_mask", "val/iou", "val/loss", "lr-AdamW"} <= tags, sorted(tags)
    assert any(t.startswith("val/predictions") for t in tags)


# ------------------------------------------------------------------------------------------ learning


def val_curve(out: Path) -> list[dict[str, float]]:
    (path,) = out.glob("csv/*/metrics.csv")
    rows = list(csv.DictReader(path.open()))
    return [{k: float(v) for k, v in r.items() if v} for r in rows]


def overfit_cfg(root: Path, tmp_path: Path, *overrides: str) -> DictConfig:
    cfg = job_cfg(root, tmp_path, "debug=overfit", "data.batch_size=2", "data.prompts.max_prompts_per_image=3",
                  "compare_with_start=true", "module.metrics.ap_every_n_epochs=0", "trainer.log_every_n_steps=1",
                  *overrides)
    with open_dict(cfg):  # debug configs log nothing; keep a CSV of the curves
        cfg.logger = {"csv": {"_target_": "lightning.pytorch.loggers.CSVLogger", "save_dir": "${paths.output_dir}",
                              "name": "csv"}}
    return cfg


@pytest.mark.slow
def test_overfitting_a_batch_drives_the_loss_down(synthetic_root: Path, tmp_path: Path) -> None:
    """debug=overfit on the randomly initialised tiny base: the losses on the memorised batch fall steadily."""
    cfg = overfit_cfg(synthetic_root, tmp_path, "lora=full", "module.optimizer.lr=5e-3", "trainer.max_epochs=12",
                      "trainer.overfit_batches=1")
    run(cfg)
    results = json.loads((output_dir() / "results.json").read_text())
    assert results["best"]["val/loss"] < 0.85 * results["start"]["val/loss"], results
    train = [r["train/loss"] for r in val_curve(output_dir()) if "train/loss" in r]
    assert len(train) == 12
    assert max(train[-3:]) < 0.85 * train[0], train


@pytest.mark.slow
def test_lora_on_the_pretrained_base_learns_the_demos_new_words(tmp_path: Path) -> None:
    """experiment=demo (LoRA on the shipped tiny-pretrained base) memorising 8 images of its categories, whose
    words the base never read: val/iou on those images rises well above the zero-shot start, the loss falls."""
    from sam3lora.data.synthetic_shapes import write_synthetic

    categories = list(OmegaConf.load(CONF / "experiment" / "demo.yaml").data.synthetic.categories)
    root = write_synthetic(tmp_path / "demo", train=8, val=2, categories=categories, seed=3, hard_negatives=0.0)
    cfg = overfit_cfg(root, tmp_path, "experiment=demo", "data.batch_size=4", "data.prompts.max_prompts_per_image=8",
                      "trainer.max_epochs=30", "trainer.overfit_batches=2", "trainer.check_val_every_n_epoch=10")
    assert cfg.model.name_or_path == "tiny-pretrained" and cfg.data.root == str(root)
    run(cfg)
    results = json.loads((output_dir() / "results.json").read_text())
    start, best = results["start"], results["best"]
    assert best["val/loss"] < 0.9 * start["val/loss"], results
    assert best["val/iou"] > start["val/iou"] + 0.1, results


# ------------------------------------------------------------------------------------------ subprocess (Hydra)


@pytest.mark.slow
def test_multirun_writes_one_output_directory_per_job(synthetic_root: Path, tmp_path: Path) -> None:
    run_cli("-m", "lora=minimal,balanced", f"data.root={synthetic_root}", f"paths.root_dir={tmp_path}", *SMALL,
            *LEAN[:3], "logger=csv", cwd=tmp_path)
    (sweep,) = (tmp_path / "logs" / "train" / "multiruns").iterdir()
    assert (sweep / "multirun.yaml").is_file()
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1"]
    for job, (preset, rank) in zip(jobs, [("minimal", 8), ("balanced", 16)], strict=True):
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
        assert f"lora={preset}" in overrides
        results = json.loads((job / "results.json").read_text())
        assert results["output_dir"] == str(job) and "val/iou" in results["best"]
        assert json.loads((job / "adapter" / "adapter_config.json").read_text())["r"] == rank
        assert (job / "checkpoints" / "last.ckpt").is_file() and list(job.glob("csv/*/metrics.csv"))
        assert (job / "train.log").is_file()


@pytest.mark.slow
def test_optuna_sweep_returns_the_metric_to_the_sweeper(synthetic_root: Path, tmp_path: Path) -> None:
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="pip install -e '.[sweep]'")
    # val/loss (minimised) differs from trial to trial after even one step; val/iou of a random base is 0
    run_cli("hparams_search=optuna", "debug=fdr", f"data.root={synthetic_root}", f"paths.root_dir={tmp_path}",
            *SMALL[:3], "optimized_metric=val/loss", "hydra.sweeper.direction=minimize", "hydra.sweeper.n_trials=2",
            "hydra.sweeper.sampler.n_startup_trials=2", cwd=tmp_path)
    (sweep,) = (tmp_path / "logs" / "debug" / "multiruns").iterdir()
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert set(best["best_params"]) == {"module.optimizer.lr", "lora.rank"}
    assert 1e-5 <= best["best_params"]["module.optimizer.lr"] <= 3e-3 and best["best_params"]["lora.rank"] in (4, 8, 16)
    trials = {}
    for job in (p for p in sweep.iterdir() if (p / "results.json").is_file()):
        overrides = dict(o.split("=", 1) for o in yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()))
        trials[job.name] = (overrides, json.loads((job / "results.json").read_text())["best"]["val/loss"])
    assert len(trials) == 2
    values = [v for _, v in trials.values()]
    assert max(values) > min(values) and best["best_value"] == pytest.approx(min(values))
    (best_overrides,) = [o for o, v in trials.values() if v == min(values)]
    assert int(best_overrides["lora.rank"]) == best["best_params"]["lora.rank"]  # each trial got its parameters
