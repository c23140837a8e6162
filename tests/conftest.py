"""Shared fixtures: offline hub, a per-session preset cache, the tiny model and a seeded input batch."""

from __future__ import annotations

import os

# Before anything imports triton.language (lightning and transformers do): the official SAM 3 focal-loss kernels
# of the oracle tests run on the CPU through Triton's interpreter (tests/sam3_oracle.py). No GPU code runs here.
os.environ.setdefault("TRITON_INTERPRET", "1")

from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import lightning as L  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session", autouse=True)
def sam3lora_home(tmp_path_factory: pytest.TempPathFactory):
    """Materialised presets go to a fresh directory per test session (never the user's cache)."""
    home = tmp_path_factory.mktemp("sam3lora_home")
    old = os.environ.get("SAM3LORA_HOME")
    os.environ["SAM3LORA_HOME"] = str(home)
    yield home
    if old is None:
        os.environ.pop("SAM3LORA_HOME", None)
    else:
        os.environ["SAM3LORA_HOME"] = old


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Pin torch to one thread for a test module: on 2 shared cores two threads make steps 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 train / 4 val synthetic images, written once per test session (shared by the test files)."""
    from sam3lora.data.synthetic_shapes import write_synthetic

    root = tmp_path_factory.getbasetemp() / "synthetic_6x4"
    if not (root / "val" / "annotations.json").is_file():
        write_synthetic(root, train=6, val=4, size=224, seed=0)
    return root


@pytest.fixture
def tiny():
    """A fresh ``(model, processor)`` of the tiny preset (seed 0), loaded through ``from_pretrained``."""
    from sam3lora.model import load_model

    return load_model("tiny", dtype="float32", seed=0)


def make_inputs(processor, rows: int = 2, boxes: bool = False, text: bool = True, seed: int = 0) -> dict:
    """Model inputs for ``rows`` (image, prompt) rows at the processor's size; boxes are normalised cxcywh."""
    g = torch.Generator().manual_seed(seed)
    size = processor.image_processor.size["height"]
    prompts = ["red circle", "blue square", "green triangle", "yellow star"][:rows]
    tokens = processor.tokenizer(
        prompts if text else ["visual"] * rows, padding="max_length", max_length=32, return_tensors="pt"
    )
    inputs = {
        "pixel_values": torch.randn(rows, 3, size, size, generator=g),
        "input_ids": tokens["input_ids"],
        "attention_mask": tokens["attention_mask"],
    }
    if boxes:
        centre = torch.rand(rows, 2, 2, generator=g) * 0.4 + 0.3
        wh = torch.rand(rows, 2, 2, generator=g) * 0.2 + 0.1
        inputs["input_boxes"] = torch.cat([centre, wh], dim=-1)
        inputs["input_boxes_labels"] = torch.tensor([[1, 0]] * rows)
    else:  # one padding box: the geometry encoder still adds its CLS token, as the official model does
        inputs["input_boxes"] = torch.zeros(rows, 1, 4)
        inputs["input_boxes_labels"] = torch.full((rows, 1), -10)
    return inputs


def save_lightning_checkpoint(module: L.LightningModule, path: Path) -> dict:
    """Write ``module``'s checkpoint as a ``fit`` writes it (Lightning's own dump: hyperparameters, loops, version,
    then the module's ``on_save_checkpoint``), without training; returns what was written."""
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", devices=1)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(path, weights_only=True)
    return torch.load(path, map_location="cpu", weights_only=True)

