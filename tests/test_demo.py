"""sam3lora-demo without a browser: the prediction service on the tiny preset, upload checks, parsing, the CLI."""

from __future__ import annotations

import io
import json
import os
import zipfile

import pytest
import torch
from PIL import Image

from sam3lora.adapter import save_adapter
from sam3lora.cli import demo as demo_cli
from sam3lora.config import defaults
from sam3lora.demo.examples import synthetic_examples
from sam3lora.demo.runs import base_of, newest_adapter, synthetic_categories_of
from sam3lora.demo.service import (
    ROW_HEADERS,
    DemoError,
    DemoService,
    UploadLimits,
    add_corner,
    check_upload,
    parse_boxes,
    parse_prompts,
)
from sam3lora.inference import PromptError, Sam3LoRAPredictor
from sam3lora.lora import apply_lora
from sam3lora.model import load_model

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def save_random_adapter(path, seed: int = 1):
    """A random-B LoRA adapter for the tiny preset (seed 0) that visibly changes the outputs."""
    settings = defaults("lora/_base", init=False, rank=4, alpha=16, vision_encoder={"enabled": True},
                            detr_decoder={"enabled": True}, mask_decoder={"enabled": True})
    model, _ = load_model("tiny", dtype="float32", seed=0)
    torch.manual_seed(seed)
    save_adapter(apply_lora(model, settings).eval(), path, settings)
    return path


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    return save_random_adapter(tmp_path_factory.mktemp("demo_adapter") / "tuned")


@pytest.fixture(scope="module")
def service(adapter_dir, one_thread, tmp_path_factory):
    predictor = Sam3LoRAPredictor.from_pretrained("tiny", {"tuned": adapter_dir}, merge=False)
    return DemoService(predictor, out_root=tmp_path_factory.mktemp("demo_out"))


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    return synthetic_examples(tmp_path_factory.mktemp("demo_examples") / "ex", count=2)


def test_predict_compares_base_and_adapter(service, examples):
    steps = []
    example = examples[0]
    result = service.predict(example.image, "red circle, blue square", "20,30,120,140", threshold=0.0,
                             progress=lambda f, text: steps.append((f, text)), image_name="ex.png")
    picture = Image.open(example.image)
    # one overlay per model, at the image's size, captioned with the model
    assert [caption.split(":")[0] for _, caption in result.overlays] == ["base", "tuned"]
    assert all(im.size == picture.size for im, _ in result.overlays)
    assert [f for f, _ in steps] == sorted(f for f, _ in steps) and "tuned" in steps[1][1]
    # instance table: both models, both prompts, the agreed columns, best first per (model, prompt)
    assert {(r["model"], r["prompt"]) for r in result.rows} == {
        (m, p) for m in ("base", "tuned") for p in ("red circle", "blue square")
    }
    assert all(list(r) == list(ROW_HEADERS) for r in result.rows)
    assert len(result.table()) == len(result.rows) and len(result.table()[0]) == len(ROW_HEADERS)
    base_scores = [r["score"] for r in result.rows if r["model"] == "base" and r["prompt"] == "red circle"]
    assert base_scores == sorted(base_scores, reverse=True)
    tuned_scores = [r["score"] for r in result.rows if r["model"] == "tuned" and r["prompt"] == "red circle"]
    assert base_scores != tuned_scores, "the adapter should change the outputs"
    assert "| base |" in result.summary and "| tuned |" in result.summary
    # masks archive: one PNG per row, named <model>/<prompt>_<k>.png, binary, at the image's size
    with zipfile.ZipFile(result.masks_zip) as archive:
        names = archive.namelist()
        assert len(names) == len(result.rows)
        assert "base/red-circle_000.png" in names and "tuned/blue-square_000.png" in names
        mask = Image.open(io.BytesIO(archive.read("tuned/red-circle_000.png")))
        assert mask.size == picture.size and set(mask.getdata()) <= {0, 255}
    # COCO json: pycocotools opens it and takes its detections
    from pycocotools.coco import COCO

    doc = json.loads(result.coco_json.read_text())
    assert [c["name"] for c in doc["categories"]] == ["red circle", "blue square"]
    assert doc["images"][0]["file_name"] == "ex.png" and len(doc["annotations"]) == len(result.rows)
    assert {a["model"] for a in doc["annotations"]} == {"base", "tuned"}
    coco = COCO(str(result.coco_json))
    assert len(coco.loadRes(doc["annotations"]).getAnnIds()) == len(result.rows)


def test_predict_high_threshold_and_bad_prompts(service, examples):
    empty = service.predict(examples[1].image, ["red circle"], threshold=1.0)
    assert empty.rows == [] and "lower it" in empty.summary
    with zipfile.ZipFile(empty.masks_zip) as archive:
        assert archive.namelist() == []
    with pytest.raises(PromptError, match="no prompt"):
        service.predict(examples[1].image, " , ", "")
    with pytest.raises(PromptError, match="outside the image"):
        service.predict(examples[1].image, "red circle", "0,0,500,20")
    with pytest.raises(DemoError, match="four numbers"):
        service.predict(examples[1].image, "red circle", "1,2,3")
    with pytest.raises(DemoError, match=r"thresholds must be in \[0, 1\]"):
        service.predict(examples[1].image, "red circle", threshold=1.5)


def test_bad_uploads_are_refused_with_the_problem_named(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not an image at all")
    with pytest.raises(DemoError, match=r"notes.png: not an image"):
        check_upload(text)
    wide = tmp_path / "wide.png"
    Image.effect_noise((300, 20), 60).convert("RGB").save(wide)  # noise: a few KB
    with pytest.raises(DemoError, match=r"wide.png: image is 300x20 px, larger than the 256 px per side"):
        check_upload(wide, UploadLimits(max_side=256))
    with pytest.raises(DemoError, match=r"upload.png: file is .* MB, more than the 0.0001 MB"):
        check_upload(wide, UploadLimits(max_megabytes=0.0001), name="upload.png")
    broken = tmp_path / "broken.png"
    broken.write_bytes(wide.read_bytes()[:60])
    with pytest.raises(DemoError, match="broken.png: a damaged image"):
        check_upload(broken)
    with pytest.raises(DemoError, match="missing"):
        check_upload(tmp_path / "gone.png")
    image = check_upload(wide, UploadLimits(max_side=300))
    assert image.mode == "RGB" and image.size == (300, 20)


def test_prompt_box_and_corner_parsing():
    assert parse_prompts("red circle, blue square;\n green triangle ,") == ["red circle", "blue square",
                                                                            "green triangle"]
    assert parse_prompts(None) == []
    assert parse_boxes("1,2,30,40\n5 6 70 80; ") == [(1, 2, 30, 40), (5, 6, 70, 80)]
    with pytest.raises(DemoError, match="box '1,2': expected four numbers"):
        parse_boxes("1,2")
    pending, text, hint = add_corner(None, "", 50, 10)
    assert pending == (50, 10) and text == "" and "opposite corner" in hint
    pending, text, hint = add_corner(pending, "1,2,3,4", 20, 40)
    assert pending is None and text == "1,2,3,4\n20,10,50,40" and "Added box 20,10,50,40" in hint
    assert add_corner((5, 5), "", 5, 9)[:2] == (None, "")


def test_cli_help_and_adapter_arguments(capsys):
    with pytest.raises(SystemExit) as exit_info:
        demo_cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--adapter [NAME=]PATH" in out and "--max-image-side" in out and "127.0.0.1" in out
    assert demo_cli.parse_adapter("tuned=runs/a/adapter") == ("tuned", "runs/a/adapter")
    assert demo_cli.parse_adapter("runs/a/adapter") == (None, "runs/a/adapter")
    assert demo_cli.parse_adapter("runs/x=1/adapter") == (None, "runs/x=1/adapter")
    args = demo_cli.build_parser().parse_args(["--adapter", "a=x", "--adapter", "y/adapter", "--port", "8000"])
    assert args.adapter == [("a", "x"), (None, "y/adapter")] and args.host == "127.0.0.1" and args.port == 8000


def test_cli_plan_finds_the_newest_run_and_its_base(tmp_path, adapter_dir):
    parse = demo_cli.build_parser().parse_args
    runs = tmp_path / "runs"
    # no run: the tiny base alone, saying so
    plan = demo_cli.plan_models(parse(["--runs", str(runs)]))
    assert (plan.base, plan.adapters) == ("tiny", {}) and "make train" in plan.notes[0]
    # two runs: the newest adapter, and the base (and tiny seed) its Hydra config names
    for name, seed in (("2026-01-01_00-00-00", 3), ("2026-02-01_00-00-00", 5)):
        (runs / name / ".hydra").mkdir(parents=True)
        (runs / name / ".hydra" / "config.yaml").write_text(f"model:\n  name_or_path: tiny\n  seed: {seed}\n")
        (runs / name / "adapter").mkdir()
        (runs / name / "adapter" / "adapter_config.json").write_text("{}")
    old = runs / "2026-01-01_00-00-00" / "adapter" / "adapter_config.json"
    os.utime(old, (old.stat().st_mtime - 100,) * 2)
    assert newest_adapter(runs) == runs / "2026-02-01_00-00-00" / "adapter"
    plan = demo_cli.plan_models(parse(["--runs", str(runs)]))
    assert plan.adapters == {"finetuned": str(runs / "2026-02-01_00-00-00" / "adapter")}
    assert (plan.base, plan.seed) == ("tiny", 5)
    # an adapter directory alone: its sam3lora.json sidecar names the materialised tiny preset
    assert base_of(adapter_dir).name == "tiny" and base_of(adapter_dir).seed == 0
    plan = demo_cli.plan_models(parse(["--adapter", str(adapter_dir), "--adapter", f"other={adapter_dir}"]))
    assert plan.base == "tiny" and list(plan.adapters) == ["tuned", "other"]
    with pytest.raises(ValueError, match="reserved for the base model"):
        demo_cli.plan_models(parse(["--adapter", f"base={adapter_dir}"]))


def test_examples_follow_the_categories_the_run_trained_on(tmp_path):
    """A synthetic run's examples show (and prompt) its own categories, not the generator's defaults."""
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / "adapter").mkdir()
    (run / ".hydra" / "config.yaml").write_text(
        "data:\n  synthetic:\n    categories: [purple pentagon, black ellipse]\n")
    categories = synthetic_categories_of(run / "adapter")
    assert categories == ["purple pentagon", "black ellipse"]
    examples = synthetic_examples(tmp_path / "ex", count=2, categories=categories)
    prompts = {name.strip() for e in examples for name in e.prompt.split(",")}
    assert prompts and prompts <= set(categories), prompts
    (run / ".hydra" / "config.yaml").write_text("data:\n  synthetic: null\n")
    assert synthetic_categories_of(run / "adapter") is None


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert demo_cli.main(["--adapter", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sam3lora-demo: error:") and "\n" not in err and "Traceback" not in err
    assert demo_cli.main(["--base", "tiny", "--max-image-side", "8"]) == 2
    assert "--max-image-side" in capsys.readouterr().err


def test_app_builds_with_the_expected_parts(service, examples):
    gr = pytest.importorskip("gradio")
    from sam3lora.demo.page import _error, build_app, read_upload

    app = build_app(service, examples, threshold=0.2)
    ids = {c.get("props", {}).get("elem_id") for c in app.get_config_file()["components"]}
    assert {"image", "prompts", "boxes", "run", "overlays", "instances", "downloads", "examples"} <= ids
    assert read_upload(None, UploadLimits()) is None
    assert read_upload({"path": str(examples[0].image), "orig_name": "a.png"}, UploadLimits()).info[
        "sam3lora_name"] == "a.png"
    with pytest.raises(gr.Error, match="larger than the 64 px"):
        read_upload({"path": str(examples[0].image)}, UploadLimits(max_side=64))
    # any failure becomes one line in the page: user errors as they are, others named with their type
    assert str(_error(PromptError("no prompt"))) == repr("no prompt")
    assert "prediction failed (RuntimeError: boom at line 2)" in str(_error(RuntimeError("boom\nat line 2")))
