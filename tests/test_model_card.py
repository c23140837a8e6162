"""Model cards of adapters and merged exports; the card's plain-transformers snippet reproduces Sam3LoRAPredictor.

One short training run (the tiny preset, 6 train / 4 val synthetic images, one epoch of two batches) leaves an
adapter whose README.md is checked: Hugging Face metadata, no template placeholder, no absolute path, the run's
data, training settings and start-vs-best table. The snippet is cut out of that README.md and executed as written
(only its BASE / ADAPTER / MODEL / IMAGES / PROMPTS / THRESHOLD lines are replaced): plain ``Sam3Model`` +
``PeftModel`` and the functions the card carries, no sam3lora import. Its results must equal the predictor's:
scores and boxes to 1e-5, masks identical.
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from hydra.core.hydra_config import HydraConfig
from PIL import Image
from test_train_app import SMALL, job_cfg

from sam3lora.inference import Sam3LoRAPredictor
from sam3lora.model import load_model, materialise_tiny

pytestmark = pytest.mark.usefixtures("one_thread")
CONF = Path(__file__).resolve().parents[1] / "conf"
RUN_OVERRIDES = [*SMALL, "lora=minimal", "~callbacks.plots", "~callbacks.lr_monitor", "~callbacks.progress_bar",
                 "~logger"]
ABSOLUTE_PATH = re.compile(r"(?<![\w:/.~-])/(?:[\w.-]+/)+[\w.-]*")
PLACEHOLDER = "[More Information Needed]"


# ------------------------------------------------------------------------------------------------ helpers
def front_matter(card: str) -> dict[str, Any]:
    assert card.startswith("---\n"), card[:80]
    return yaml.safe_load(card.split("---\n", 2)[1])


def snippet_of(card: str) -> str:
    """The Python block under the card's "With plain transformers" heading."""
    section = card[card.index("### With plain transformers") :]
    start = section.index("```python\n") + len("```python\n")
    return section[start : section.index("\n```", start)]


def set_lines(code: str, **values: Any) -> str:
    """Replace the assignment line ``NAME = ...`` of each of ``values`` (each must occur exactly once)."""
    for name, value in values.items():
        code, count = re.subn(rf"^{name} = .*$", f"{name} = {value!r}", code, flags=re.M)
        assert count == 1, f"{name}: {count} assignment lines in the snippet"
    return code


def run_snippet(code: str) -> list[list[dict[str, torch.Tensor]]]:
    """Execute the snippet in a fresh namespace; it imports torch, PIL, transformers and peft only."""
    imported = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(str(node.module).split(".")[0])
    assert imported <= {"torch", "PIL", "transformers", "peft"}, imported
    namespace: dict[str, Any] = {"__name__": "__card_snippet__"}
    with contextlib.redirect_stdout(io.StringIO()):
        exec(compile(code, "<model card snippet>", "exec"), namespace)
    return namespace["results"]


def assert_same(expected: list, got: list) -> int:
    """Predictor results vs snippet results: same count, scores and boxes to 1e-5, identical masks."""
    assert len(expected) == len(got)
    instances = 0
    for per_image, snippet_image in zip(expected, got, strict=True):
        assert len(per_image) == len(snippet_image)
        for result, found in zip(per_image, snippet_image, strict=True):
            assert len(result) == len(found["scores"])
            torch.testing.assert_close(found["scores"], result.scores, atol=1e-5, rtol=0)
            torch.testing.assert_close(found["boxes"], result.boxes, atol=1e-5, rtol=0)
            assert found["masks"].dtype == torch.bool and torch.equal(found["masks"], result.masks)
            instances += len(result)
    return instances


def no_machine_paths(text: str, where: str) -> None:
    assert PLACEHOLDER not in text, where
    for path in {os.getcwd(), str(Path.home()), os.environ["SAM3LORA_HOME"], "/tmp/", str(CONF.parents[1]) + os.sep}:
        assert path not in text, f"{where} names {path}"
    found = ABSOLUTE_PATH.findall(text)
    assert not found, f"{where}: absolute paths {found[:3]}"


@pytest.fixture(scope="module")
def run_dir(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One short training run through the app (start validation, fit, best validation, results.json)."""
    from sam3lora.training.run_training import run

    root = tmp_path_factory.mktemp("card_run")
    cfg = job_cfg(synthetic_root, root, *RUN_OVERRIDES, name="run")
    out = root / "run"
    try:
        run(cfg)
    finally:
        HydraConfig.instance().cfg = None
    yield out


@pytest.fixture(scope="module")
def image_paths(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Five images (more than one predictor batch of 4): the synthetic val images and two random odd sizes."""
    folder = tmp_path_factory.mktemp("card_images")
    paths = sorted(str(p) for p in (synthetic_root / "val" / "images").iterdir())[:3]
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(90, 130), (150, 110)]):
        path = folder / f"random{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


# ------------------------------------------------------------------------------------------------ the card
def test_adapter_card_of_a_training_run(run_dir: Path) -> None:
    adapter = run_dir / "adapter"
    card = (adapter / "README.md").read_text()
    results = json.loads((run_dir / "results.json").read_text())
    meta = front_matter(card)
    assert meta["library_name"] == "peft" and meta["pipeline_tag"] == "image-segmentation"
    assert meta["license"] == "apache-2.0" and "lora" in meta["tags"]
    assert "base_model" not in meta  # the tiny preset is not on the hub
    for name in ("README.md", "adapter_config.json", "sam3lora.json"):
        no_machine_paths((adapter / name).read_text(), name)
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny-seed0"
    # base and LoRA
    sidecar = json.loads((adapter / "sam3lora.json").read_text())
    assert sidecar["base"]["name_or_path"] == "tiny-seed0"
    assert f"`{sidecar['base']['architecture']}`" in card and f"`{sidecar['base']['weights']}`" in card
    lora_rows = {line.split("|")[1].strip(): line for line in card.splitlines() if line.startswith("| detr_")}
    assert set(lora_rows) == {"detr_encoder", "detr_decoder"}  # lora=minimal, plus the mask decoder
    assert "| mask_decoder | lora | 8 | 16 | q_proj, k_proj, v_proj, o_proj | all |" in card
    # data: split counts and categories of the synthetic set (6 train / 4 val images)
    assert "| train | train | 6 |" in card and "| val | val | 4 |" in card
    for category in sidecar["run"]["data"]["categories"]:
        assert f"| {category['id']} | {category['name']} |" in card
    # training settings
    assert "| epochs | 1 of 1 |" in card and "| seed | 42 |" in card and "| precision | 32-true |" in card
    assert "| peak learning rate | 0.0003 |" in card
    # evaluation: every validation metric of results.json, start and best, final numbers
    assert "Interim" not in card and "| metric | start (base, zero-shot) | best (epoch 0) |" in card
    for key, best in results["best"].items():
        start = results["start"][key]
        assert f"| {key} | {start:.4f} | {best:.4f} |" in card, key
    assert sidecar["run"]["evaluation"]["final"] is True


def test_snippet_of_the_card_reproduces_the_predictor(run_dir: Path, image_paths: list[str]) -> None:
    adapter = run_dir / "adapter"
    card = (adapter / "README.md").read_text()
    code = snippet_of(card)
    assert "PeftModel.from_pretrained" in code and "def sam3_inputs" in code
    categories = [c["name"] for c in json.loads((adapter / "sam3lora.json").read_text())["run"]["data"]["categories"]]
    texts = categories[:2]
    boxes = [[10.0, 12.0, 60.0, 50.0], [0.0, 0.0, 30.0, 30.0]]
    base = str(materialise_tiny(0))
    merged = Sam3LoRAPredictor.from_pretrained("tiny", adapter)  # merges the single adapter, as the snippet
    unmerged = Sam3LoRAPredictor.from_pretrained("tiny", adapter, merge=False)
    checked = 0
    cases = [
        (texts, None, [(t, []) for t in texts]),  # text only: one padding box per row
        (texts[:1], boxes, [(texts[0], boxes)]),  # text + exemplar boxes
    ]
    for threshold in (0.0, 0.05):
        for text, exemplars, prompts in cases:
            code_here = set_lines(
                code, BASE=base, ADAPTER=str(adapter), IMAGES=image_paths, PROMPTS=prompts, THRESHOLD=threshold
            )
            expected = merged.predict(image_paths, text=text, boxes=exemplars, threshold=threshold)
            checked += assert_same(expected, run_snippet(code_here))
            if threshold == 0.0:  # the PeftModel left unmerged matches the unmerged predictor
                plain_peft = code_here.replace(".merge_and_unload()", "")
                expected = unmerged.predict(image_paths, text=text, boxes=exemplars, threshold=threshold)
                checked += assert_same(expected, run_snippet(plain_peft))
    assert checked > 5 * 20 * 3  # every query of every row at threshold 0 (20 queries), and more


def test_merged_export_writes_the_same_card_and_its_snippet_reproduces_the_predictor(
    run_dir: Path, image_paths: list[str], tmp_path: Path
) -> None:
    from sam3lora.cli.export import main

    out = tmp_path / "merged"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["--base", "tiny", "--adapter", str(run_dir / "adapter"), "--out", str(out)]) == 0
    card = (out / "README.md").read_text()
    meta = front_matter(card)
    assert meta["library_name"] == "transformers" and "merged-lora" in meta["tags"]
    for path in out.iterdir():
        if path.suffix in (".json", ".md", ".txt"):
            no_machine_paths(path.read_text(), path.name)
    adapter_card = (run_dir / "adapter" / "README.md").read_text()
    for section in ("## LoRA", "## Data", "## Training", "## Evaluation"):  # the adapter's facts, repeated
        part = adapter_card[adapter_card.index(section) : adapter_card.index("\n## ", adapter_card.index(section) + 3)]
        assert part in card, section
    code = snippet_of(card)
    assert "from peft" not in code and "Sam3Model.from_pretrained(MODEL" in code
    text = ["red circle", "blue square"]
    code = set_lines(code, MODEL=str(out), IMAGES=image_paths, PROMPTS=[(t, []) for t in text], THRESHOLD=0.0)
    expected = Sam3LoRAPredictor.from_pretrained(str(out)).predict(image_paths, text=text, threshold=0.0)
    assert_same(expected, run_snippet(code))


def test_card_without_a_run_and_for_a_hub_base(tmp_path: Path) -> None:
    """An adapter saved outside training says so (no placeholder); a hub base is named in ``base_model``."""
    from sam3lora.adapter import save_adapter
    from sam3lora.config import defaults
    from sam3lora.lora import apply_lora
    from sam3lora.model_card import lora_facts, render

    model, _ = load_model("tiny", dtype="float32", seed=0)
    settings = defaults("lora/_base", rank=4, detr_decoder={"enabled": True}, modules_to_save=["dot_product_scoring"])
    peft_model = apply_lora(model, settings)
    card = (save_adapter(peft_model, tmp_path / "adapter", settings) / "README.md").read_text()
    no_machine_paths(card, "README.md")
    assert "saved outside a sam3lora training run" in card and "## Evaluation" in card
    assert "| dot_product_scoring | trained in full (modules_to_save) |" in card
    facts = {
        "kind": "adapter",
        "base": {"name_or_path": "facebook/sam3", "architecture": "0123456789abcdef", "weights": None},
        "lora": lora_facts(peft_model, settings),
        "run": None,
        "ref": "adapter",
    }
    hub_card = render(facts)
    meta = front_matter(hub_card)
    assert meta["base_model"] == "facebook/sam3" and meta["base_model_relation"] == "adapter"
    assert meta["license"] == "other" and meta["license_name"] == "sam-license"
    assert 'BASE = "facebook/sam3"' in snippet_of(hub_card)
    assert "--base facebook/sam3 --adapter adapter" in hub_card


def test_portable_names() -> None:
    from sam3lora.fingerprint import portable_base_name, portable_path

    assert portable_base_name("facebook/sam3") == "facebook/sam3"
    assert portable_base_name("/home/me/.cache/sam3lora/tiny-seed3") == "tiny-seed3"
    assert portable_base_name("/opt/x/sam3lora/assets/tiny-pretrained") == "tiny-pretrained"
    assert portable_base_name("/data/models/my-sam3") == "my-sam3"
    assert portable_base_name(None) is None
    assert portable_path(Path.cwd() / "data" / "demo") == "data/demo"
    assert portable_path("/somewhere/else/demo") == "demo"


def test_transformers_processor_differs_where_the_card_says(image_paths: list[str]) -> None:
    """Text only: transformers' processor sends no box, ours one padding box (label -10); given our inputs the
    model is the same, and the geometry encoder's CLS token changes the outputs."""
    from sam3lora.sam3 import sam3_forward, sam3_inputs

    model, processor = load_model("tiny", dtype="float32", seed=0)
    image = Image.open(image_paths[0]).convert("RGB")
    theirs = processor(images=image, text="red circle", return_tensors="pt")
    assert "input_boxes" not in theirs
    ours = sam3_inputs(processor, [image], [("red circle", [])])
    assert ours["input_boxes_labels"].tolist() == [[-10]] and ours["input_boxes"].abs().sum() == 0
    assert torch.equal(ours["pixel_values"], theirs["pixel_values"])
    with torch.no_grad():
        without_box = model(**theirs)
    scores, _, _ = sam3_forward(model, ours)
    their_scores = without_box.pred_logits.sigmoid() * without_box.presence_logits.sigmoid()
    assert not torch.allclose(scores, their_scores, atol=1e-4)
