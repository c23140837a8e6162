"""``scripts/benchmark.py``: each mode runs in seconds on ``tiny`` and writes valid JSON; OOM is recorded, not fatal.

Timings are printed by the harness, never asserted here: the checks are that the numbers exist, are consistent
with each other (rows/s = rows / step time, FLOPs grow with the rows) and that the bookkeeping is right.
"""

from __future__ import annotations

import importlib.util
import json
import math
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py"
FAST = ["--steps", "2", "--warmup", "1", "--quiet", "--isolate", "off"]


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("sam3lora_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run(bench: ModuleType, tmp_path: Path, *argv: str) -> dict:
    out, md = tmp_path / "bench.json", tmp_path / "bench.md"
    payload = bench.main([*argv[:1], *FAST, *argv[1:], "--json", str(out), "--markdown", str(md)])  # later wins
    written = json.loads(out.read_text())  # valid JSON, and the same as what main returned
    assert written["results"] == json.loads(json.dumps(payload["results"], default=str))
    assert written["meta"]["command"].startswith("python scripts/benchmark.py " + argv[0])
    assert written["meta"]["device"] == "cpu" and written["meta"]["load_end"]
    lines = md.read_text().splitlines()  # Markdown tables: header, alignment, one line per configuration
    assert lines[0] == f"`{written['meta']['command']}`"
    table = [line for line in lines if line.startswith("| ")]
    assert "| batch |" in table[0] and len(table) == 2 + len(written["results"]) + bool(written["ratios"]) * (
        2 + len(written["ratios"]))
    again = bench.main(["--from-json", str(out), "--markdown", str(tmp_path / "again.md")])
    assert again == written and (tmp_path / "again.md").read_text() == md.read_text()
    return written


def check_speed(record: dict) -> None:
    assert record["status"] == "ok", record["status"]
    assert record["step_s"] > 0 and record["step_s_min"] <= record["step_s"] <= record["step_s_max"]
    seconds = record["total_s"] / record["batches"] if "total_s" in record else record["step_s"]  # data: mean
    assert math.isclose(record["rows_per_s"], record["rows"] / seconds, rel_tol=1e-9)
    assert math.isclose(record["images_per_s"], record["images"] / seconds, rel_tol=1e-9)
    assert record["peak_gb"] > 0.1  # the process's peak RSS: python, torch and the model at least


def test_train_mode_runs_on_tiny_and_writes_json(bench: ModuleType, tmp_path: Path) -> None:
    payload = run(bench, tmp_path, "train", "--presets", "minimal", "--batch-sizes", "2", "--prompts", "3")
    (record,) = payload["results"]
    check_speed(record)
    assert record["rows"] == 6 and record["images"] == 2 and record["preset"] == "minimal"
    assert record["loss_finite"] and record["loss_first"] > 0
    assert record["flops_per_step"] > 1e9 and record["tflops_per_s"] > 0
    assert record["mfu"] is None  # no peak known for a CPU
    assert 0 < record["trainable_params"] < 1e6
    assert payload["ratios"] == []  # one configuration: nothing to compare


def test_predict_mode_runs_on_tiny_and_writes_json(bench: ModuleType, tmp_path: Path) -> None:
    payload = run(bench, tmp_path, "predict", "--presets", "balanced", "--batch-sizes", "1", "--prompts", "2",
                  "--text-cache", "on", "--peak-tflops", "1.0")
    (record,) = payload["results"]
    check_speed(record)
    assert record["rows"] == 2 and record["text_cache_hits"] > 0
    assert "loss_first" not in record  # no training in predict mode
    assert record["mfu"] == pytest.approx(record["tflops_per_s"] / 1.0)


def test_data_mode_runs_the_real_pipeline_and_writes_json(bench: ModuleType, tmp_path: Path) -> None:
    payload = run(bench, tmp_path, "data", "--image-size", "224", "--images", "4", "--workers", "0",
                  "--batch-sizes", "2", "--data-root", str(tmp_path / "synthetic"))
    (record,) = payload["results"]
    check_speed(record)
    assert (tmp_path / "synthetic" / "train" / "annotations.json").is_file()
    assert record["images"] == 2 and record["rows"] >= 2  # several prompts (positives and negatives) per image


def test_loss_mode_times_the_criterion_alone(bench: ModuleType, tmp_path: Path) -> None:
    payload = run(bench, tmp_path, "loss", "--batch-sizes", "2", "--prompts", "2", "--mask-loss", "full,points",
                  "--image-size", "448")
    full, points = payload["results"]
    for record in (full, points):
        check_speed(record)
        assert record["rows"] == 4 and record["flops_per_step"] is None
    (q,) = payload["ratios"]
    assert (q["axis"], q["value"], q["baseline"]) == ("mask_loss", "points", "full")


def test_ratios_compare_each_axis_with_its_baseline_and_flops_exclude_recomputation(
    bench: ModuleType, tmp_path: Path
) -> None:
    payload = run(bench, tmp_path, "train", "--presets", "full", "--batch-sizes", "1", "--prompts", "2",
                  "--activation-checkpointing", "off,on", "--steps", "1", "--warmup", "0")
    plain, ckpt = payload["results"]
    assert (plain["ckpt"], ckpt["ckpt"]) == (False, True) and plain["status"] == ckpt["status"] == "ok"
    # the model's FLOPs are the same with checkpointing: the recomputation in backward is not counted
    assert ckpt["flops_per_step"] == plain["flops_per_step"] > 1e9
    (q,) = payload["ratios"]
    assert (q["axis"], q["value"], q["baseline"], q["config"]) == ("ckpt", True, False, {})
    assert q["step_time_ratio"] == pytest.approx(ckpt["step_s"] / plain["step_s"])
    assert q["step_mem_ratio"] == pytest.approx(ckpt["step_mem_gb"] / plain["step_mem_gb"])


def test_out_of_memory_is_recorded_and_the_run_goes_on(
    bench: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []

    def fake(models, config, args, device, tmp):  # a card that fits one image per batch
        calls.append(config["batch"])
        if config["batch"] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return {"step_s": 0.5, "step_s_min": 0.5, "step_s_max": 0.5, "rows": 4, "images": 1, "rows_per_s": 8.0,
                "images_per_s": 2.0, "peak_gb": 1.0, "step_mem_gb": 0.5, "flops_per_step": None}

    monkeypatch.setattr(bench, "run_model_config", fake)
    payload = run(bench, tmp_path, "train", "--presets", "minimal,balanced", "--batch-sizes", "1,2,4")
    status = {(r["preset"], r["batch"]): r["status"] for r in payload["results"]}
    assert status == {
        ("minimal", 1): "ok", ("minimal", 2): "OOM", ("minimal", 4): "OOM (batch 2 did)",
        ("balanced", 1): "ok", ("balanced", 2): "OOM", ("balanced", 4): "OOM (batch 2 did)",
    }
    assert calls == [1, 2, 1, 2]  # a batch larger than one that ran out of memory is not tried


def test_impossible_combinations_are_skipped_with_the_reason(bench: ModuleType, tmp_path: Path) -> None:
    payload = run(bench, tmp_path, "train", "--presets", "balanced", "--batch-sizes", "1", "--prompts", "1",
                  "--vision-cache", "memory", "--flops", "off")
    (record,) = payload["results"]
    assert record["status"].startswith("skipped: module.perf.cache_vision_features needs a frozen, un-adapted")


def test_peak_flops_by_device_name(bench: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = torch.device("cuda")
    for name, peak in [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200", 989.0),
                       ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA L4", 121.0), ("NVIDIA L40S", 362.0),
                       ("NVIDIA GeForce RTX 4090", 165.0), ("Some Future GPU", None)]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda _d=None, name=name: name)
        assert bench.peak_tflops(cuda, None) == peak, name
    assert bench.peak_tflops(cuda, 500.0) == 500.0
    assert bench.peak_tflops(torch.device("cpu"), None) is None


def test_sam3_config_at_a_reduced_size_gives_consistent_feature_maps() -> None:
    from transformers.models.sam3.modeling_sam3 import Sam3VisionModel

    from sam3lora.perf.random_inputs import sam3_config, sam3_processor

    config = sam3_config(168)  # 12 x 12 patches
    assert config.image_size == 168 and config.vision_config.backbone_feature_sizes == [[48, 48], [24, 24], [12, 12]]
    assert sam3_processor(168).image_processor.mask_size == {"height": 48, "width": 48}
    backbone = config.vision_config.backbone_config  # narrower and shallower, same geometry: a fast forward
    backbone.hidden_size, backbone.intermediate_size, backbone.num_attention_heads = 64, 128, 2
    backbone.num_hidden_layers, backbone.global_attn_indexes = 2, [1]
    config.vision_config.fpn_hidden_size = 32
    with torch.no_grad():
        out = Sam3VisionModel(config.vision_config)(torch.randn(1, 3, 168, 168))
    assert [tuple(t.shape[-2:]) for t in out.fpn_hidden_states] == [(48, 48), (24, 24), (12, 12), (6, 6)]
    with pytest.raises(ValueError, match="multiple of 14"):
        sam3_config(1000)


def test_memory_mode_counts_saved_bytes_per_component(bench: ModuleType, tmp_path: Path) -> None:
    payload = run(bench, tmp_path, "memory", "--presets", "balanced", "--batch-sizes", "1", "--prompts", "2",
                  "--activation-checkpointing", "off,heads,detr_decoder+mask_decoder")
    plain, heads, two = payload["results"]
    assert [r["status"] for r in payload["results"]] == ["ok"] * 3
    assert heads["ckpt"] == ["geometry_encoder", "detr_encoder", "detr_decoder", "mask_decoder"]
    assert two["ckpt"] == ["detr_decoder", "mask_decoder"]
    for record in (plain, heads, two):
        parts = record["saved_gb_per_image_by_component"]
        assert math.isclose(sum(parts.values()), record["saved_gb_per_image"], rel_tol=1e-9)
        assert record["rows"] == 2 and record["images"] == 1 and record["step_s"] > 0 and record["loss"] > 0
        assert {"vision_encoder", "detr_encoder", "detr_decoder", "mask_decoder", "loss"} <= set(parts)
        assert "text_encoder" not in parts  # frozen in balanced: keeps nothing
    assert plain["checkpoint_input_gb_per_image"] == {}
    assert set(two["checkpoint_input_gb_per_image"]) == {"detr_decoder", "mask_decoder"}
    for component in ("detr_encoder", "detr_decoder", "mask_decoder"):
        assert heads[f"saved_{component}_gb"] < 0.5 * plain[f"saved_{component}_gb"], component
    assert two["saved_detr_encoder_gb"] == plain["saved_detr_encoder_gb"]  # not checkpointed: unchanged
    ratios = {(q["value"] if isinstance(q["value"], str) else "+".join(q["value"])): q for q in payload["ratios"]}
    assert ratios["geometry_encoder+detr_encoder+detr_decoder+mask_decoder"]["saved_ratio"] == pytest.approx(
        heads["saved_gb_per_image"] / plain["saved_gb_per_image"])
    table = (tmp_path / "bench.md").read_text()
    assert "| heads |" in table and "DETR dec+mask dec" in table and "saved GB/img" in table
