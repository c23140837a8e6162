"""Reliability (issue 15): resume into a new run directory, whole-or-absent checkpoints, a missing data root,
one-line errors, bad images.

Training runs are the train app's, composed from the real config (as ``tests/test_train_app.py`` does), small:
the tiny preset, 6 train / 4 val synthetic images, 2 training and 1 validation batch per epoch, one thread.
"""

from __future__ import annotations

import errno
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import pytest
import test_train_app
import torch
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from safetensors.torch import load_file
from test_train_app import LEAN, SMALL, add_callbacks, job_cfg  # one way to build a job's config

from sam3lora.training.run_training import run

pytestmark = pytest.mark.usefixtures("one_thread")
CONF = Path(__file__).resolve().parents[1] / "conf"
hydra_runtime = test_train_app.hydra_runtime  # autouse: forget the Hydra runtime a test set up


# ------------------------------------------------------------------------------------------ 1. resume


SCRIPT = {0: 0.2, 1: 0.9, 2: 0.5, 3: 0.4}  # the scripted score: best at epoch 1, then worse


class Scripted(L.Callback):
    """Logs ``val/scripted`` = SCRIPT[epoch] while fitting (0 in a later validate) so the best epoch is known,
    records every validation's logged values under ``tag``, and reseeds torch's global RNG each training epoch
    (Lightning does not checkpoint it; the DETR layers use dropout) so runs can be compared value for value."""

    logged: ClassVar[dict[str, dict[int, dict[str, float]]]] = {}

    def __init__(self, tag: str) -> None:
        self.tag = tag
        Scripted.logged[tag] = {}

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        torch.manual_seed(1000 + trainer.current_epoch)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        fitting = trainer.state.fn == "fit"
        pl_module.log("val/scripted", SCRIPT[trainer.current_epoch] if fitting else 0.0)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit":
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("val/", "train/"))}
            Scripted.logged[self.tag][trainer.current_epoch] = metrics


def adapter_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


@pytest.mark.slow
def test_resume_into_a_new_run_directory_restores_the_best(synthetic_root: Path, tmp_path: Path) -> None:
    """A (stopped after epoch 1, the best) resumed as B in a new directory equals the uninterrupted C: the same
    values logged in epochs 2-3, and B's own best.ckpt, adapter/, best_adapter.json and results.json hold
    epoch 1's best, as C's do."""
    common = [*SMALL, *LEAN, "trainer.max_epochs=4", "lora=minimal", "optimized_metric=val/scripted"]

    def job(name: str, *extra: str, stop: bool = False) -> Path:
        cfg = job_cfg(synthetic_root, tmp_path, *common, *extra, name=name)
        add_callbacks(cfg, scripted={"_target_": f"{__name__}.Scripted", "tag": name})
        if stop:
            add_callbacks(cfg, stop={"_target_": "test_train_app.StopAfterEpoch", "epoch": 1})
        run(cfg)
        return tmp_path / name

    a = job("A", stop=True)
    b = job("B", f"ckpt_path={a / 'checkpoints' / 'last.ckpt'}")
    c = job("C")
    logged = Scripted.logged
    assert sorted(logged["A"]) == [0, 1] and sorted(logged["B"]) == [2, 3] and sorted(logged["C"]) == [0, 1, 2, 3]
    for epoch in (2, 3):  # the resumed epochs log what the uninterrupted run logged
        assert logged["B"][epoch].keys() == logged["C"][epoch].keys()
        for key, value in logged["C"][epoch].items():
            assert logged["B"][epoch][key] == pytest.approx(value, rel=1e-5, abs=1e-6), (epoch, key)
    # the best checkpoint: in B's own directory, epoch 1's, the same weights as C's
    best_b = torch.load(b / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)
    best_c = torch.load(c / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)
    assert best_b["epoch"] == best_c["epoch"] == 1
    for key, value in best_c["state_dict"].items():
        torch.testing.assert_close(best_b["state_dict"][key], value, msg=key)
    assert (a / "checkpoints" / "best.ckpt").is_file()  # the earlier run is left as it was
    # the best adapter: written in B's directory, equal to C's
    assert (b / "adapter" / "adapter_config.json").is_file()
    weights_b, weights_c = adapter_weights(b), adapter_weights(c)
    assert weights_b.keys() == weights_c.keys() and weights_b
    for key, value in weights_c.items():
        torch.testing.assert_close(weights_b[key], value, msg=key)
    record_b = json.loads((b / "best_adapter.json").read_text())
    assert record_b == json.loads((c / "best_adapter.json").read_text())
    assert (record_b["epoch"], record_b["score"]) == (1, pytest.approx(0.9))
    # results.json: B's best is epoch 1's, from B's own best.ckpt
    results_b = json.loads((b / "results.json").read_text())
    results_c = json.loads((c / "results.json").read_text())
    assert results_b["best_checkpoint"] == str(b / "checkpoints" / "best.ckpt")
    assert results_b["resumed_from"] == str(a / "checkpoints" / "last.ckpt")
    assert results_b["best"]["val/loss"] == pytest.approx(results_c["best"]["val/loss"], rel=1e-5)
    assert results_b["best"]["val/loss"] == pytest.approx(logged["C"][1]["val/loss"], rel=1e-5)


# ------------------------------------------------------------------------------------------ 2. whole checkpoints


def test_checkpoint_write_that_runs_out_of_space_leaves_the_old_file(tmp_path: Path, monkeypatch) -> None:
    """ENOSPC half-way through a checkpoint write: the final path keeps the previous checkpoint, whole, and no
    temporary file is left behind."""
    from sam3lora.training.checkpoint import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "best.ckpt"
    io.save_checkpoint({"epoch": 0, "w": torch.arange(10)}, path)
    before = path.read_bytes()
    real_save = torch.save

    def full_disk(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        real_save(obj, f, *args, **kwargs)
        f.truncate(f.tell() // 2)  # half of it reached the disk
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError) as info:
        io.save_checkpoint({"epoch": 1, "w": torch.arange(1000)}, path)
    assert info.value.errno == errno.ENOSPC
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["best.ckpt"]
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["epoch"] == 0


class FillDisk(L.Callback):
    """At the start of epoch ``epoch`` fill the filesystem of the run directory: no checkpoint fits any more."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        import os

        if trainer.current_epoch != self.epoch:
            return
        stat = os.statvfs(trainer.default_root_dir)
        with open(Path(trainer.default_root_dir) / "filler", "wb") as f:
            f.write(b"\0" * (stat.f_bavail * stat.f_frsize))


@pytest.fixture
def small_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A 64 MiB tmpfs (root only; skipped where mounting is not allowed), unmounted afterwards."""
    import subprocess

    where = tmp_path / "small"
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(where)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_full_disk_during_training_leaves_no_partial_checkpoint(
    synthetic_root: Path, tmp_path: Path, small_filesystem: Path
) -> None:
    """A run whose disk (a small tmpfs) is full when its first checkpoint is due stops with ENOSPC and leaves no
    checkpoint file at all (Lightning's own writer stages the file in the system temp directory and then copies
    it to its final name, where the copy stops half-way: a truncated best.ckpt)."""
    cfg = job_cfg(synthetic_root, tmp_path, *SMALL, *LEAN, "lora=minimal", "~callbacks.best_adapter",
                  name="small/job")
    add_callbacks(cfg, fill={"_target_": f"{__name__}.FillDisk", "epoch": 0})
    with pytest.raises(OSError) as info:
        run(cfg)
    assert info.value.errno == errno.ENOSPC, info.value
    checkpoints = small_filesystem / "job" / "checkpoints"
    assert not checkpoints.exists() or not list(checkpoints.iterdir()), list(checkpoints.iterdir())


# ------------------------------------------------------------------------------------------ 3. data.root


def compose_data(tmp_path: Path, *overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=[f"paths.root_dir={tmp_path}", *overrides])


def datamodule(cfg: DictConfig, processor: Any) -> Any:
    from sam3lora.training.run_training import build

    return build(cfg.data, "data", processor=processor)


SMALL_SET = ["data.synthetic.train=2", "data.synthetic.val=1", "data.synthetic.size=64"]


@pytest.fixture(scope="module")
def processor() -> Any:
    from sam3lora.model import load_model

    return load_model("tiny", dtype="float32", seed=0)[1]


def hashes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_data_root_typo_is_an_error_naming_it(tmp_path: Path, processor: Any) -> None:
    """The default (synthetic) data config with a data.root that does not exist: one line naming the path, and
    nothing generated there."""
    from sam3lora.data.data_error import DataError

    typo = tmp_path / "data" / "synthetc"
    dm = datamodule(compose_data(tmp_path, f"data.root={typo}", *SMALL_SET), processor)
    with pytest.raises(DataError) as info:
        dm.prepare_data()
    message = str(info.value)
    assert message.startswith(f"{typo}: data.root does not exist") and "\n" not in message, message
    assert "data.synthetic.root" in message and "overwrite" not in message
    assert not typo.exists()


def test_data_root_of_another_folder_is_never_replaced(tmp_path: Path, processor: Any) -> None:
    """data.root naming a real folder that is not in the canonical layout: an error, no overwrite suggested, and
    neither the trainer nor ``sam3lora-data synthetic --overwrite`` touches it."""
    from sam3lora.cli.data import main as data_main
    from sam3lora.data.data_error import DataError
    from sam3lora.data.synthetic_shapes import write_synthetic

    real = tmp_path / "my_dataset"
    (real / "images").mkdir(parents=True)
    (real / "images" / "0001.jpg").write_bytes(b"not really a jpeg")
    (real / "labels.json").write_text("{}")
    before = hashes(real)
    dm = datamodule(compose_data(tmp_path, f"data.root={real}", *SMALL_SET), processor)
    with pytest.raises(DataError) as info:
        dm.prepare_data()
    assert "holds no dataset" in str(info.value) and "overwrite" not in str(info.value)
    with pytest.raises(DataError) as info:  # asked to generate exactly there: still refused, it is not ours
        datamodule(compose_data(tmp_path, f"data.synthetic.root={real}", *SMALL_SET), processor).prepare_data()
    assert "not a generated synthetic set" in str(info.value) and "overwrite" not in str(info.value)
    with pytest.raises(DataError, match="never replaced"):
        write_synthetic(real, train=1, val=1, size=64, overwrite=True)
    assert data_main(["synthetic", "--out", str(real), "--train", "1", "--val", "1", "--size", "64",
                      "--overwrite"]) == 2
    assert hashes(real) == before


def test_synthetic_set_is_generated_where_asked_and_marked(tmp_path: Path, processor: Any) -> None:
    """The config's own location (default data.root), an explicit data.synthetic.root, and experiment=demo
    (what ``make train`` runs) generate their set on demand, marked; a marked set can be regenerated."""
    from sam3lora.data.synthetic_shapes import MARKER, write_synthetic

    default = compose_data(tmp_path, *SMALL_SET)
    assert default.data.root == default.data.synthetic.root == f"{tmp_path}/data/synthetic"
    datamodule(default, processor).prepare_data()
    chosen = compose_data(tmp_path, f"data.synthetic.root={tmp_path / 'mine'}", *SMALL_SET)
    assert chosen.data.root == str(tmp_path / "mine")
    datamodule(chosen, processor).prepare_data()
    demo = compose_data(tmp_path, "experiment=demo", *SMALL_SET)
    assert demo.data.root == f"{tmp_path}/data/demo"
    datamodule(demo, processor).prepare_data()
    for root in (tmp_path / "data" / "synthetic", tmp_path / "mine", tmp_path / "data" / "demo"):
        assert (root / "train" / "annotations.json").is_file() and (root / MARKER).is_file(), root
    marker = json.loads((tmp_path / "data" / "demo" / MARKER).read_text())
    assert marker["categories"] == list(demo.data.synthetic.categories)
    write_synthetic(tmp_path / "mine", train=1, val=1, size=64, overwrite=True)  # ours: may be replaced
    assert len(json.loads((tmp_path / "mine" / "train" / "annotations.json").read_text())["images"]) == 1


# ------------------------------------------------------------------------------------------ 4. one-line errors


@pytest.fixture
def adapter_dir(tmp_path: Path) -> Path:
    from sam3lora.adapter import save_adapter
    from sam3lora.config import defaults
    from sam3lora.lora import apply_lora
    from sam3lora.model import load_model

    settings = defaults("lora/_base", rank=4, detr_decoder={"enabled": True}, mask_decoder={"enabled": True})
    base = load_model("tiny", dtype="float32", seed=0)[0]
    return save_adapter(apply_lora(base, settings), tmp_path / "adapter", settings)


def predict_cli(*args: str) -> tuple[int, str]:
    import contextlib
    import io

    from sam3lora.cli.predict import main

    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = main(list(args))
    text = err.getvalue()
    assert "Traceback" not in text, text
    return code, "\n".join(line for line in text.splitlines() if "error" in line)  # not transformers' progress bars


def one_image(tmp_path: Path) -> Path:
    from PIL import Image

    path = tmp_path / "a.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(path)
    return path


def test_truncated_adapter_weights_are_one_line_naming_the_file(tmp_path: Path, adapter_dir: Path) -> None:
    from sam3lora.adapter import AdapterMismatchError, load_adapter
    from sam3lora.model import load_model

    weights = adapter_dir / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(AdapterMismatchError) as info:
        load_adapter(load_model("tiny", dtype="float32", seed=0)[0], adapter_dir)
    assert str(info.value).startswith(f"{weights}: cannot read the adapter weights") and "\n" not in str(info.value)
    code, stderr = predict_cli(str(one_image(tmp_path)), "--text", "red circle", "--base", "tiny", "--adapter",
                               str(adapter_dir), "--out", str(tmp_path / "out"), "--device", "cpu")
    assert code == 2 and "\n" not in stderr and str(weights) in stderr and "truncated" in stderr, stderr
    assert not (tmp_path / "out").exists()


def test_adapter_config_rank_disagreeing_with_the_weights_is_one_line(tmp_path: Path, adapter_dir: Path) -> None:
    from sam3lora.adapter import AdapterMismatchError, load_adapter
    from sam3lora.model import load_model

    config = adapter_dir / "adapter_config.json"
    data = json.loads(config.read_text())
    data["r"] = 8  # the weights are rank 4
    config.write_text(json.dumps(data))
    with pytest.raises(AdapterMismatchError) as info:
        load_adapter(load_model("tiny", dtype="float32", seed=0)[0], adapter_dir)
    message = str(info.value)
    assert message.startswith(f"{config}: says rank 8") and "holds rank 4" in message and "\n" not in message
    code, stderr = predict_cli(str(one_image(tmp_path)), "--text", "red circle", "--base", "tiny", "--adapter",
                               str(adapter_dir), "--out", str(tmp_path / "out"), "--device", "cpu")
    assert code == 2 and "\n" not in stderr and "says rank 8" in stderr, stderr


def train_job(cfg: DictConfig, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """``sam3lora-train``'s job function on ``cfg``: (exit status, stderr)."""
    from sam3lora.training.run_training import run_job

    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        run_job(cfg)
    text = capsys.readouterr().err
    assert "Traceback" not in text, text
    return int(info.value.code), "\n".join(line for line in text.splitlines() if "error" in line)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("lora.rank=abc", "sam3lora-train: error: lora.rank: expected an integer, got 'abc'"),
        ("++lora.detr_decoder.rank=abc", "sam3lora-train: error: lora.detr_decoder.rank: expected an integer or null"),
        ("trainer.max_epochs=abc", "sam3lora-train: error: trainer.max_epochs: expected an integer or null"),
        ("data.batch_size=0", "sam3lora-train: error: data.batch_size must be >= 1 (images per batch), got 0"),
        ("data.num_workers=x", "sam3lora-train: error: data.num_workers: expected an integer, got 'x'"),
    ],
)
def test_bad_config_values_are_one_line_with_exit_status_2(
    synthetic_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], override: str, expected: str
) -> None:
    code, stderr = train_job(job_cfg(synthetic_root, tmp_path, *SMALL, override), capsys)
    assert code == 2 and stderr.startswith(expected) and "\n" not in stderr, stderr


def test_full_error_env_gives_the_traceback(
    synthetic_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sam3lora.training.run_training import ConfigError, run_job

    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(ConfigError, match="lora.rank"):
        run_job(job_cfg(synthetic_root, tmp_path, *SMALL, "lora.rank=abc"))


def test_offline_hub_model_fails_fast_with_the_help_first(
    synthetic_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    from sam3lora.model import ModelLoadError, load_base, load_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(load_base, "_cached", lambda repo_id: False)  # whatever this machine's cache holds
    start = time.monotonic()
    code, stderr = train_job(job_cfg(synthetic_root, tmp_path, *SMALL, "model=sam3"), capsys)
    assert time.monotonic() - start < 20
    assert code == 2 and "\n" not in stderr, stderr
    assert stderr.startswith("sam3lora-train: error: could not load 'facebook/sam3': offline"), stderr
    assert "HF_TOKEN" in stderr and "model=tiny" in stderr
    # online but the hub cannot be reached: the same at once, no connection retries
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(load_base, "_hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(ModelLoadError, match="^could not load 'facebook/sam3': cannot reach the Hugging Face hub"):
        load_model("sam3", dtype="float32", seed=0)


def broken_copy(synthetic_root: Path, tmp_path: Path, damage: dict[int, Any]) -> Path:
    """Copy of the synthetic set whose train images at the given indices are damaged by ``damage[index](path)``."""
    import shutil

    root = tmp_path / "broken"
    shutil.copytree(synthetic_root, root)
    images = json.loads((root / "train" / "annotations.json").read_text())["images"]
    for index, how in damage.items():
        how(root / "train" / "images" / images[index]["file_name"])
    return root


def test_bad_sample_in_a_worker_is_one_line_useful_first(
    synthetic_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """on_bad_sample=raise with a DataLoader worker: the file and the problem on one line (not the worker's
    traceback wrapped in a RuntimeError), with the switch that skips it."""
    root = broken_copy(synthetic_root, tmp_path, {0: Path.unlink})
    cfg = job_cfg(root, tmp_path, *SMALL, *LEAN, "data.num_workers=1", "lora=minimal")
    code, stderr = train_job(cfg, capsys)
    assert code == 2 and "\n" not in stderr, stderr
    assert stderr.startswith(f"sam3lora-train: error: {root}/train/images/") and "image file not found" in stderr
    assert "data.on_bad_sample=skip" in stderr


# ------------------------------------------------------------------------------------------ 5. images


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_truncated_images_are_refused_by_every_reader(tmp_path: Path) -> None:
    """A truncated JPEG and PNG (which a lenient decoder fills with grey) are errors naming the file, in the
    training reader and in prediction alike."""
    import numpy as np
    from PIL import Image

    from sam3lora.data.images import ImageDecodeError, decode_image
    from sam3lora.data.readers import BadSampleError, CocoReader, ImageRecord
    from sam3lora.inference.errors import ImageReadError
    from sam3lora.inference.images import read_image

    rng = np.random.default_rng(0)
    for name in ("a.jpg", "b.png"):
        path = tmp_path / name
        Image.fromarray(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)).save(path)
        assert decode_image(path).shape == (64, 80, 3)
        truncate(path)
        with pytest.raises(ImageDecodeError, match="truncated") as info:
            decode_image(path)
        assert str(info.value).startswith(f"{path}: image file is truncated")
        with pytest.raises(ImageReadError, match="truncated"):
            read_image(path)
        reader = CocoReader.__new__(CocoReader)  # load_image needs no annotation index
        with pytest.raises(BadSampleError, match="truncated") as info:
            reader.load_image(ImageRecord(id=1, path=path, width=80, height=64))
        assert info.value.path == str(path)


def test_16_bit_images_are_scaled_not_clipped(tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    from sam3lora.data.images import decode_image, to_rgb8
    from sam3lora.inference.images import read_image, to_pil

    ramp = (np.arange(64 * 64, dtype=np.uint32) * 16).astype(np.uint16).reshape(64, 64)  # 0 .. 65520
    for name in ("g16.png", "g16.tif"):
        path = tmp_path / name
        Image.fromarray(ramp).save(path)
        pixels = decode_image(path)
        assert pixels.dtype == np.uint8 and pixels.shape == (64, 64, 3)
        expected = np.rint(ramp.astype(np.float64) * 255 / 65535).astype(np.uint8)
        np.testing.assert_array_equal(pixels[..., 0], expected)
        assert (pixels[..., 0] == pixels[..., 2]).all() and 100 < pixels.mean() < 155  # a ramp, not white
        np.testing.assert_array_equal(np.asarray(read_image(path)), pixels)
        with Image.open(path) as image:
            np.testing.assert_array_equal(np.asarray(to_pil(image)), pixels)
    eight_bit_wide = Image.fromarray(np.full((4, 4), 200, np.int32), "I")  # 8-bit data in a 32-bit mode
    assert (to_rgb8(eight_bit_wide) == 200).all()


def test_bad_images_under_skip_are_counted_once_each(
    synthetic_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Three bad training images (two of them neighbours, so the next-good-one replacement meets the second one
    twice): skipped, and reported as 3."""
    import logging

    from sam3lora.model import load_model
    from sam3lora.training.run_training import build

    root = broken_copy(synthetic_root, tmp_path, {1: truncate, 2: Path.unlink, 4: truncate})
    cfg = job_cfg(root, tmp_path, *SMALL, "data.on_bad_sample=skip")
    dm = build(cfg.data, "data", processor=load_model("tiny", dtype="float32", seed=0)[1])
    dm.setup("fit")
    with caplog.at_level(logging.WARNING, logger="sam3lora.data"):
        batches = list(dm.train_dataloader())
        assert dm.train_dataset.bad_count() == 3
        dm.teardown("fit")  # logs the last pass's count
    assert sum(b.num_images for b in batches) == 6  # each bad image replaced by the next good one
    assert "train split, epoch 1: skipped 3 bad sample(s)" in caplog.text
    assert caplog.text.count("image file is truncated") == 2


def test_duplicate_image_ids_are_an_error_naming_the_file(synthetic_root: Path, tmp_path: Path) -> None:
    import shutil

    from sam3lora.data.coco_convert import normalise_coco
    from sam3lora.data.data_error import DataError
    from sam3lora.data.readers import CocoReader

    root = tmp_path / "dup"
    shutil.copytree(synthetic_root, root)
    ann = root / "train" / "annotations.json"
    data = json.loads(ann.read_text())
    data["images"][3]["id"] = data["images"][1]["id"]
    ann.write_text(json.dumps(data))
    with pytest.raises(DataError) as info:
        CocoReader(root, "train")
    assert str(info.value) == f"{ann}: duplicate image id(s) [{data['images'][1]['id']}]"
    with pytest.raises(DataError, match=r"duplicate image id\(s\)"):
        normalise_coco(root, tmp_path / "converted")
    assert not (tmp_path / "converted").exists()


# ------------------------------------------------------------------------------------------ 6. trainer flags


def test_any_trainer_flag_works_without_a_plus(tmp_path: Path) -> None:
    """``trainer.limit_train_batches=2`` (not in conf/trainer) composes as the README says: no ``+`` needed."""
    import os
    import subprocess
    import sys

    from sam3lora.cli.train import trainer_flags

    assert trainer_flags(["trainer.limit_train_batches=2", "trainer.max_epochs=3", "+trainer.fast_dev_run=true",
                          "trainer.strategy.find_unused_parameters=true", "lora=minimal", "trainer.bogus=1"]) == [
        "++trainer.limit_train_batches=2", "++trainer.max_epochs=3", "+trainer.fast_dev_run=true",
        "trainer.strategy.find_unused_parameters=true", "lora=minimal", "trainer.bogus=1"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    result = subprocess.run(
        [sys.executable, "-m", "sam3lora.cli.train", "trainer.limit_train_batches=2", "trainer.overfit_batches=1",
         f"paths.root_dir={tmp_path}", "--cfg", "job"], capture_output=True, text=True, cwd=tmp_path, env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    trainer = yaml.safe_load(result.stdout)["trainer"]
    assert trainer["limit_train_batches"] == 2 and trainer["overfit_batches"] == 1


# ------------------------------------------------------------------------------------------ 6. the demo


def test_demo_caps_prompts_and_boxes_and_removes_its_temporary_folder(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from PIL import Image

    from sam3lora.demo.service import MAX_BOXES, MAX_PROMPTS, DemoError, DemoService

    predictor = SimpleNamespace(adapters={}, merged=None)  # refused before any model runs
    service = DemoService(predictor)  # type: ignore[arg-type]
    image = Image.new("RGB", (64, 64))
    many = ", ".join(f"thing {i}" for i in range(MAX_PROMPTS + 1))
    with pytest.raises(DemoError, match=f"at most {MAX_PROMPTS} prompts"):
        service.predict(image, many)
    boxes = "\n".join("1,1,5,5" for _ in range(MAX_BOXES + 1))
    with pytest.raises(DemoError, match=f"{MAX_BOXES} boxes per request"):
        service.predict(image, "red circle", boxes)
    own = service.out_root
    assert own.is_dir()
    service.close()
    assert not own.exists()
    given = tmp_path / "demo_out"
    given.mkdir()
    DemoService(predictor, out_root=given).close()  # type: ignore[arg-type]
    assert given.is_dir()  # a folder the user named is never removed


def test_every_user_error_class_derives_from_one_base() -> None:
    """The CLIs catch one base class (sam3lora.errors.Sam3LoRAError) for their one-line errors and exit status 2."""
    from sam3lora.adapter import AdapterMismatchError
    from sam3lora.data.data_error import DataError
    from sam3lora.errors import Sam3LoRAError, user_errors
    from sam3lora.inference.errors import AdapterLoadError, ImageReadError, PredictorError, PromptError
    from sam3lora.lora import LoraTargetError
    from sam3lora.model import ModelLoadError
    from sam3lora.model.dac import DacError
    from sam3lora.perf import FeatureCacheError
    from sam3lora.training.run_training import ConfigError

    for cls in (AdapterMismatchError, DataError, AdapterLoadError, ImageReadError, PredictorError, PromptError,
                LoraTargetError, ModelLoadError, DacError, FeatureCacheError, ConfigError):
        assert issubclass(cls, Sam3LoRAError), cls
    assert Sam3LoRAError in user_errors()
