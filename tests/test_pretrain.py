"""Pretraining on cached tensors (``sam3lora.training.pretrain``, ``scripts/pretrain_tiny.py``).

A resumed run continues exactly (weights, optimiser and schedule after k + m steps equal an uninterrupted run's),
the rendered set is built once and reused, and batches cut from tensors follow the row contract.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch.utils.flop_counter import FlopCounterMode
from transformers import Sam3Model

import sam3lora.training.pretrain as pretrain
from sam3lora.model import load_model
from sam3lora.model.tiny import PRETRAINED_DIR, build_tiny, materialise_tiny, tiny_arch
from sam3lora.training.pretrain import (
    BatchMaker,
    Pretrainer,
    PretrainSettings,
    RenderSettings,
    TensorSet,
    load_or_render,
    load_state,
)

ROOT = Path(__file__).resolve().parents[1]
CATEGORIES = ("green circle", "red square", "blue triangle", "magenta star")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pretrain_cache")


@pytest.fixture(scope="module")
def train_set(cache: Path) -> TensorSet:
    return load_or_render(RenderSettings(6, 224, 3, CATEGORIES), cache)


def make_trainer(data: TensorSet, settings: PretrainSettings, variant: str = "tiny-fast") -> Pretrainer:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["loss.weight_dice=40", "module.metrics.ap_every_n_epochs=0"])
    model, processor = load_model(str(materialise_tiny(0, variant=variant)), dtype="float32", seed=0)
    model.requires_grad_(True).train()
    module = instantiate(cfg.module, model=model, criterion=instantiate(cfg.loss))
    ip = processor.image_processor
    return Pretrainer(module, data, settings, processor.tokenizer, ip.image_mean, ip.image_std)


def test_resumed_run_continues_exactly(train_set: TensorSet, tmp_path: Path) -> None:
    # 3 images per epoch of 6 at batch 2: the resume falls mid-epoch, and the warm stage ends at the resume
    settings = PretrainSettings(steps=10, warm_steps=2, batch_size=2, lr=1e-3, warmup_steps=1, seed=5)
    whole = make_trainer(train_set, settings)
    for _ in range(3):
        whole.train_step()

    first = make_trainer(train_set, settings)
    for _ in range(2):
        first.train_step()
    first.save(tmp_path / "state.pt")
    torch.manual_seed(1234)  # a resumed process starts with another global RNG state
    resumed = make_trainer(train_set, settings)
    resumed.load_state_dict(load_state(tmp_path / "state.pt"))
    assert resumed.step == 2 and resumed.images_seen == 4
    resumed.train_step()

    assert (resumed.step, resumed.images_seen) == (whole.step, whole.images_seen)
    for (name, a), b in zip(whole.module.model.state_dict().items(), resumed.module.model.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name
    opt_a, opt_b = whole.optimizer.state_dict(), resumed.optimizer.state_dict()
    assert opt_a["param_groups"] == opt_b["param_groups"]
    for key, state in opt_a["state"].items():
        for field, value in state.items():
            assert torch.equal(value, opt_b["state"][key][field]), (key, field)
    assert whole.scheduler.state_dict() == resumed.scheduler.state_dict()
    # and the run really moved: the weights differ from the start
    fresh = make_trainer(train_set, settings)
    assert any(not torch.equal(a, b) for a, b in zip(fresh.module.model.parameters(), whole.module.model.parameters(),
                                                       strict=True))


def test_cache_is_rendered_once_and_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[RenderSettings] = []
    render = pretrain.render_set

    def counting(settings: RenderSettings) -> TensorSet:
        calls.append(settings)
        return render(settings)

    monkeypatch.setattr(pretrain, "render_set", counting)
    settings = RenderSettings(3, 224, 7, CATEGORIES)
    a = load_or_render(settings, tmp_path, log=lambda _: None)
    b = load_or_render(settings, tmp_path, log=lambda _: None)
    assert len(calls) == 1 and len(list(tmp_path.glob("*.pt"))) == 1
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert torch.equal(a.instance_categories, b.instance_categories) and a.categories == b.categories
    assert not list(tmp_path.glob(".*tmp*"))  # written whole: no temporary file left
    load_or_render(RenderSettings(3, 224, 8, CATEGORIES), tmp_path, log=lambda _: None)  # other settings: new set
    assert len(calls) == 2 and len(list(tmp_path.glob("*.pt"))) == 2
    # the cached pixels are the generator's (the PNG sets hold the same images)
    from sam3lora.data.synthetic_shapes import parse_categories, render_image

    image, instances = render_image(parse_categories(CATEGORIES), 224, 7, "train", 1, 0.0)
    assert torch.equal(a.images[1], torch.from_numpy(image).permute(2, 0, 1))
    assert int(a.labels[1].max()) == len(instances)
    assert a.instance_categories[1, :len(instances)].tolist() == [c for c, _ in instances]


def test_batches_follow_the_row_contract(train_set: TensorSet) -> None:
    _, processor = load_model("tiny", dtype="float32", seed=0)
    ip = processor.image_processor
    maker = BatchMaker.build(train_set, processor.tokenizer, ip.image_mean, ip.image_std,
                             augment=pretrain.AugmentSettings(), negative_ratio=1.0)
    gen = torch.Generator().manual_seed(0)
    batch = maker(torch.arange(4), gen)
    assert batch.pixel_values.shape == (4, 3, 224, 224)
    assert batch.image_index.tolist() == sorted(batch.image_index.tolist())  # rows of an image are contiguous
    assert len(batch.targets) == batch.num_rows == len(batch.prompts) == batch.input_ids.shape[0]
    positives = [t for t in batch.targets if len(t["boxes"])]
    assert positives and len(positives) < batch.num_rows  # negatives drawn too
    for t in positives:
        assert t["masks"].shape[1:] == (224, 224) and t["masks"].flatten(1).any(1).all()
        assert ((t["boxes"] >= 0) & (t["boxes"] <= 1)).all() and (t["boxes"][:, 2:] > t["boxes"][:, :2]).all()
    # the text encoder runs once per distinct category of the batch: its rows index back every row's prompt
    assert len(batch.text_rows) == len(set(batch.prompts)) < batch.num_rows
    assert torch.equal(batch.input_ids[batch.text_rows][batch.text_index], batch.input_ids)
    assert [batch.prompts[i] for i in batch.text_rows[batch.text_index].tolist()] == batch.prompts
    again = maker(torch.arange(4), torch.Generator().manual_seed(0))
    assert torch.equal(again.pixel_values, batch.pixel_values)  # a function of the generator only
    every = BatchMaker.build(train_set, processor.tokenizer, ip.image_mean, ip.image_std, negative_ratio=None)
    assert every(torch.arange(2)).num_rows == 2 * len(CATEGORIES)  # validation: every category queried


@pytest.fixture(scope="module")
def script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("sam3lora_pretrain_tiny", ROOT / "scripts" / "pretrain_tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_script_sessions_add_up(script: ModuleType, cache: Path, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    common = ["--state", str(run), "--train", "4", "--val", "2", "--batch-size", "2", "--cache", str(cache),
              "--val-every", "1", "--device", "cpu"]
    script.main([*common, "--steps", "1"])
    with pytest.raises(SystemExit, match="--resume"):
        script.main([*common, "--steps", "1"])  # a run is never overwritten by accident
    script.main([*common, "--resume", "--steps", "2", "--out", str(tmp_path / "preset")])
    record = json.loads((run / "history.json").read_text())
    assert record["record"]["step"] == 2 and record["record"]["images_seen"] == 4
    assert [s["from_step"] for s in record["record"]["sessions"]] == [0, 1]
    assert [h["step"] for h in record["history"]] == [1, 2]
    assert (run / "best.safetensors").is_file() and (tmp_path / "preset" / "config.json").is_file()
    assert record["record"]["variant"] == script.DEFAULT_VARIANT == "tiny-fast"
    preset = Sam3Model.from_pretrained(tmp_path / "preset")
    assert preset.config.vision_config.backbone_config.patch_size == tiny_arch("tiny-fast").patch
    assert load_state(run / "state.pt")["step"] == 2
    capsys.readouterr()
    script.main([*common, "--resume", "--evaluate"])  # validates the last state, writes nothing
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["step"] == 2 and metrics["val_images"] == 2 and 0 <= metrics["val/iou"] <= 1
    assert load_state(run / "state.pt")["step"] == 2 and len(json.loads((run / "history.json").read_text())
                                                               ["record"]["sessions"]) == 2


def test_fast_variant_is_ten_times_cheaper_and_the_shipped_base_still_loads() -> None:
    # the shipped tiny-pretrained weights are the "tiny" variant: its config is unchanged
    shipped = Sam3Model.from_pretrained(PRETRAINED_DIR)
    model, _ = build_tiny(0, "tiny")
    vit_keys = ("patch_size", "window_size", "global_attn_indexes", "image_size")
    assert [getattr(shipped.config.vision_config.backbone_config, k) for k in vit_keys] == [
        getattr(model.config.vision_config.backbone_config, k) for k in vit_keys]
    assert {k: v.shape for k, v in shipped.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    fast, processor = build_tiny(0, "tiny-fast")
    side = tiny_arch("tiny-fast").mask_side
    assert processor.image_processor.mask_size == {"height": side, "width": side}
    ids = processor.tokenizer(["red square"], padding="max_length", max_length=32, return_tensors="pt")
    flops = {}
    for name, m in (("tiny", model), ("tiny-fast", fast)):
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            out = m(pixel_values=torch.zeros(1, 3, 224, 224), input_ids=ids.input_ids,
                    attention_mask=ids.attention_mask)
        flops[name] = counter.get_total_flops()
        assert out.pred_masks.shape[-1] == tiny_arch(name).mask_side
    assert flops["tiny-fast"] * 10 <= flops["tiny"], flops


def test_spread_reference_boxes_reach_the_first_decoder_layer() -> None:
    # transformers' init puts every query's reference box at ~(0.5, 0.5, 0.5, 0.5): the symmetry issue #12 traced
    model, processor = build_tiny(0, "tiny-fast")
    assert model.detr_decoder.reference_points.weight.sigmoid().std(0).max() < 0.05
    boxes = pretrain.spread_reference_boxes(model, seed=3, size=0.2)
    assert torch.equal(boxes, pretrain.spread_reference_boxes(build_tiny(1, "tiny-fast")[0], seed=3, size=0.2))
    assert boxes[:, :2].std(0).min() > 0.15
    assert ((boxes[:, :2] >= 0.05) & (boxes[:, :2] <= 0.95)).all() and (boxes[:, 2:] == 0.2).all()
    ids = processor.tokenizer(["red square"], padding="max_length", max_length=32, return_tensors="pt")
    with torch.no_grad():
        out = model(pixel_values=torch.zeros(1, 3, 224, 224), input_ids=ids.input_ids,
                    attention_mask=ids.attention_mask)
    torch.testing.assert_close(out.decoder_reference_boxes[0, 0], boxes, atol=1e-5, rtol=0)
