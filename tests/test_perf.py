"""Speed/memory switches (``sam3lora.perf``, ``module.perf``): each one must leave the numbers as they were.

Everything runs on the tiny preset with random ``Sam3Batch``es (``sam3lora.perf.random_inputs``), one torch thread.
The module is built from the composed ``conf/train.yaml`` as the training app builds it.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict

from sam3lora.config import defaults
from sam3lora.data.synthetic_shapes import write_synthetic
from sam3lora.lora import apply_lora
from sam3lora.model import load_model
from sam3lora.perf import (
    FeatureCacheError,
    VisionFeatureCache,
    check_deterministic,
)
from sam3lora.perf.checkpointing import CHECKPOINTABLE, ENCODERS, checkpoint_layers, checkpointed_components
from sam3lora.perf.random_inputs import synthetic_batch
from sam3lora.training.module import Sam3LoRAModule
from sam3lora.training.run_training import ConfigError, run

CONF = str(Path(__file__).resolve().parents[1] / "conf")


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def compose_cfg(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("train", overrides=list(overrides))


def build_module(*overrides: str) -> Sam3LoRAModule:
    cfg = compose_cfg(*overrides)
    model, _ = load_model(**cfg.model)
    lora = instantiate(cfg.lora)
    torch.manual_seed(0)
    return instantiate(cfg.module, model=apply_lora(model, lora), criterion=instantiate(cfg.loss), lora_settings=lora)


def batch_for(module: Sam3LoRAModule, images: int = 2, prompts: int = 3, seed: int = 0, first_id: int = 0):
    text = module.base_model.config.text_config
    return synthetic_batch(
        images, prompts, module.base_model.config.image_size, text.vocab_size, distinct_prompts=3, seed=seed,
        first_image_id=first_id, bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id,
    )


def assert_same_step(loss: torch.Tensor, grads: dict, ref_loss: torch.Tensor, ref_grads: dict) -> None:
    """The loss and every trainable parameter's gradient equal the reference step's (checkpointing changes none)."""
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def loss_and_grads(module: Sam3LoRAModule, batch, seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Training-mode loss (dropout drawn from ``seed``) and the gradients of every trainable parameter."""
    module.train()
    module.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with warnings.catch_warnings():  # self.log without a Trainer only warns
        warnings.simplefilter("ignore")
        loss = module.training_step(batch, 0)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def count_forwards(module: torch.nn.Module) -> list[int]:
    """Calls of ``module`` (a pre-hook: a recomputation that stops early never reaches the forward hooks)."""
    calls: list[int] = []
    module.register_forward_pre_hook(lambda _m, _a: calls.append(1))
    return calls


# ----------------------------------------------------------------------------------------------- vision cache


def test_cached_vision_features_give_the_same_loss_and_gradients_and_skip_the_encoder() -> None:
    module = build_module("lora=minimal", "++lora.init=false")  # random B: adapters change the outputs
    batch = batch_for(module)
    plain_loss, plain_grads = loss_and_grads(module, batch)
    module.configure_perf(defaults("module/default.perf", cache_vision_features="memory"))
    vision_calls = count_forwards(module.base_model.vision_encoder)
    fill_loss, _ = loss_and_grads(module, batch)  # first epoch: computed and stored
    assert len(vision_calls) == 1 and module.vision_cache.misses == batch.num_images
    hit_loss, hit_grads = loss_and_grads(module, batch)  # later epochs: read back
    assert len(vision_calls) == 1, "the vision encoder ran on a cache hit"
    assert module.vision_cache.hits == batch.num_images and len(module.vision_cache) == batch.num_images
    torch.testing.assert_close(fill_loss, plain_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hit_loss, plain_loss, rtol=1e-5, atol=1e-5)
    assert plain_grads.keys() == hit_grads.keys() and plain_grads
    for name, grad in plain_grads.items():
        torch.testing.assert_close(hit_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_vision_cache_sees_changed_pixels_and_keeps_train_and_val_apart() -> None:
    module = build_module("lora=minimal", "++module.perf.cache_vision_features=memory")
    assert isinstance(module.vision_cache, VisionFeatureCache)  # built from the config key
    batch = batch_for(module)
    with torch.no_grad():
        module.train()
        module(batch)
        module.eval()
        module(batch)  # validation: its own namespace, so computed again
    assert module.vision_cache.misses == 2 * batch.num_images and module.vision_cache.hits == 0
    module.train()
    flipped = batch.pixel_values.clone()
    flipped[1] = flipped[1].flip(-1)  # a random horizontal flip: same pixel values, other places
    shifted = batch.pixel_values.clone()
    shifted[0, :, :, 8:] = batch.pixel_values[0, :, :, :-8]  # random_square padded the image elsewhere
    for pixels, image_id in ((flipped, 1), (shifted, 0)):
        batch.pixel_values = pixels
        with torch.no_grad(), pytest.raises(FeatureCacheError, match=f"pixels of image {image_id} .*changed"):
            module(batch)


def test_disk_vision_cache_is_read_by_a_new_process_and_namespaced_by_the_base(tmp_path: Path) -> None:
    directory = str(tmp_path / "features")
    module = build_module("lora=minimal", "++module.perf.cache_vision_features=disk",
                          f"++module.perf.vision_cache_dir={directory}", "++module.perf.vision_cache_dtype=bfloat16")
    batch = batch_for(module, first_id=10)
    module.eval()
    with torch.no_grad():
        first = module(batch)["pred_logits"]
    assert sorted(p.name for p in Path(directory).glob("*/*.pt")) == ["10.pt", "11.pt"]
    module.configure_perf(module.perf)  # a fresh cache object, as in a new run
    vision_calls = count_forwards(module.base_model.vision_encoder)
    with torch.no_grad():
        again = module(batch)["pred_logits"]
    assert not vision_calls and module.vision_cache.hits == 2
    torch.testing.assert_close(again, first, rtol=0, atol=0.05)  # stored in bfloat16, restored to float32
    assert again.dtype == torch.float32
    other = build_module("lora=minimal", "model.seed=1", "++module.perf.cache_vision_features=disk",
                         f"++module.perf.vision_cache_dir={directory}")
    other.eval()
    with torch.no_grad():
        other(batch)
    assert other.vision_cache.misses == 2  # another base never reads these features
    assert len(list(Path(directory).iterdir())) == 2


def test_vision_cache_is_refused_for_an_adapted_encoder_and_random_transforms(tmp_path: Path) -> None:
    with pytest.raises(InstantiationException) as info:
        build_module("lora=balanced", "++module.perf.cache_vision_features=memory")
    message = str(info.value.__cause__)
    assert "module.perf.cache_vision_features" in message and "vision_encoder" in message and "lora=minimal" in message
    _, processor = load_model("tiny", dtype="float32", seed=0)
    cfg = compose_cfg(f"data.root={tmp_path}")
    random = instantiate(cfg.data, processor=processor)  # the default: random_square + flip + colour jitter
    expected = r"random op\(s\) \['OneOf \(random choice\)', 'PadIfNeeded', 'HorizontalFlip', 'ColorJitter'\]"
    with pytest.raises(FeatureCacheError, match=expected):
        check_deterministic(random)
    cfg.data.train_transforms = {"resize": "letterbox"}  # assigned whole (instantiate's kwargs would merge)
    check_deterministic(instantiate(cfg.data, processor=processor))  # resize only: accepted
    cfg.data.train_transforms = {"resize": "stretch", "augment": [{"_target_": "albumentations.HorizontalFlip",
                                                                   "p": 0.0}]}
    check_deterministic(instantiate(cfg.data, processor=processor))  # p = 0 never fires


# ----------------------------------------------------------------------------------------------- text cache


def test_text_feature_cache_gives_the_same_outputs_once_per_distinct_prompt() -> None:
    module = build_module("lora=balanced", "++lora.init=false")
    batch = batch_for(module, images=2, prompts=4)
    distinct = len({tuple(row) for row in batch.input_ids.tolist()})
    assert distinct < batch.num_rows  # prompts repeat, as a dataset's categories do
    module.eval()
    with torch.no_grad():
        plain = module(batch)
        module.configure_perf(defaults("module/default.perf", cache_text_features=True))
        text_rows: list[int] = []
        module.base_model.text_encoder.register_forward_pre_hook(
            lambda _m, _a, kwargs: text_rows.append(kwargs["input_ids"].shape[0]), with_kwargs=True
        )
        cached = module(batch)
        again = module(batch)
    assert text_rows == [distinct], text_rows  # one encoder call, over the distinct prompts only
    assert module.text_cache.hits == batch.num_rows + (batch.num_rows - distinct)
    for key in ("pred_logits", "pred_boxes", "presence_logits", "pred_masks", "semantic_seg"):
        torch.testing.assert_close(cached[key], plain[key], rtol=0, atol=1e-5, msg=key)
        torch.testing.assert_close(again[key], plain[key], rtol=0, atol=1e-5, msg=key)
    for layer_plain, layer_cached in zip(plain["aux_outputs"], cached["aux_outputs"], strict=True):
        torch.testing.assert_close(layer_cached["pred_boxes"], layer_plain["pred_boxes"], rtol=0, atol=1e-5)
    # keyed by the batch's host texts: a warm cache never reads the token ids (on a GPU that read would synchronise)
    on_meta = module.text_cache(module.base_model.text_encoder, batch.input_ids.to("meta"),
                                batch.attention_mask.to("meta"), batch.prompts)
    direct = module.base_model.text_encoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    torch.testing.assert_close(on_meta, direct.last_hidden_state, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="text cache: 1 texts for"):
        module.text_cache(module.base_model.text_encoder, batch.input_ids, batch.attention_mask, batch.prompts[:1])


def test_text_cache_is_refused_when_the_text_encoder_trains() -> None:
    with pytest.raises(InstantiationException) as info:
        build_module("lora=full", "++module.perf.cache_text_features=true")
    assert "module.perf.cache_text_features" in str(info.value.__cause__)


# ----------------------------------------------------------------------------------------------- checkpointing


def test_activation_checkpointing_gives_the_same_gradients_and_recomputes() -> None:
    module = build_module("lora=full", "++lora.init=false")  # adapters in both encoders: gradients flow through them
    batch = batch_for(module)
    plain_loss, plain_grads = loss_and_grads(module, batch)
    module.configure_perf(defaults("module/default.perf", activation_checkpointing=True))
    assert checkpointed_components(module.model) == ["vision_encoder", "text_encoder"]
    assert len(checkpoint_layers(module.model, ENCODERS)) == 4 + 2  # every ViT and CLIP block of the tiny preset
    # a block's submodules run again when backward recomputes the block (the block's own hooks do not)
    mlps = [module.base_model.get_submodule(n) for n in ("vision_encoder.backbone.layers.0.mlp",
                                                          "text_encoder.text_model.encoder.layers.1.mlp")]
    calls = [count_forwards(mlp) for mlp in mlps]
    ckpt_loss, ckpt_grads = loss_and_grads(module, batch)
    assert [len(c) for c in calls] == [2, 2], "no block was recomputed in backward"
    assert_same_step(ckpt_loss, ckpt_grads, plain_loss, plain_grads)
    module.configure_perf(defaults("module/default.perf"))
    assert checkpointed_components(module.model) == []


HEADS = ["geometry_encoder", "detr_encoder", "detr_decoder", "mask_decoder"]


def test_checkpointing_the_heads_gives_the_same_gradients_and_recomputes() -> None:
    """The plain-module components (their layers; the mask decoder as one block), DAC pass included."""
    module = build_module("lora=balanced", "++lora.init=false")  # adapters in every head: gradients reach them all
    assert module.use_dac
    batch = batch_for(module)
    plain_loss, plain_grads = loss_and_grads(module, batch)
    blocks = checkpoint_layers(module.model, HEADS)
    assert sorted(blocks) == sorted(
        [f"geometry_encoder.layers.{i}" for i in range(len(module.base_model.geometry_encoder.layers))]
        + [f"detr_encoder.layers.{i}" for i in range(len(module.base_model.detr_encoder.layers))]
        + [f"detr_decoder.layers.{i}" for i in range(len(module.base_model.detr_decoder.layers))]
        + ["mask_decoder"]
    )
    module.configure_perf(defaults("module/default.perf", activation_checkpointing=HEADS))
    assert checkpointed_components(module.model) == HEADS
    inner = {
        "geometry_encoder.layers.0.mlp": 2,
        "detr_encoder.layers.0.mlp": 2,
        "detr_decoder.layers.0.mlp": 4,  # the one-to-one pass and the DAC pass, each recomputed
        "mask_decoder.pixel_decoder": 2,
    }
    calls = {name: count_forwards(module.base_model.get_submodule(name)) for name in inner}
    ckpt_loss, ckpt_grads = loss_and_grads(module, batch)
    assert {name: len(c) for name, c in calls.items()} == inner, "a block was not recomputed in backward"
    # the decoder layers kept their reference boxes and rebuilt the box-RPB mask (checked against the original)
    assert module.base_model.detr_decoder.__dict__.get("_sam3lora_rpb_checked")
    assert_same_step(ckpt_loss, ckpt_grads, plain_loss, plain_grads)
    module.configure_perf(defaults("module/default.perf"))
    assert checkpointed_components(module.model) == []
    decoder_layer = module.base_model.detr_decoder.layers[0]
    assert "forward" not in vars(decoder_layer) and not hasattr(decoder_layer, "gradient_checkpointing")


def _dac_loss_and_grads(module: Sam3LoRAModule, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A loss on the DAC (one-to-many) outputs alone, and the gradients it gives the trainable parameters."""
    module.train()
    module.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    o2m = module(batch)["o2m"]
    parts = [o2m["pred_logits"], o2m["pred_boxes"], o2m["pred_masks"].dense()]
    parts += [aux[k] for aux in o2m["aux_outputs"] for k in ("pred_logits", "pred_boxes")]
    loss = sum((p * torch.linspace(-1, 1, p.numel()).view_as(p)).sum() for p in parts)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def test_decoder_checkpointing_replays_the_dac_pass() -> None:
    """Recomputing a decoder layer of the DAC pass must zero its self-attention again (the keyword is replayed)."""
    module = build_module("lora=balanced", "++lora.init=false")
    batch = batch_for(module)
    plain_loss, plain_grads = _dac_loss_and_grads(module, batch)
    module.configure_perf(defaults("module/default.perf", activation_checkpointing=["detr_decoder"]))
    attn = [layer.self_attn for layer in module.base_model.detr_decoder.layers]
    dac_calls: list[int] = []

    def before_backward(grad: torch.Tensor) -> torch.Tensor:
        dac_calls.extend(a._sam3lora_dac_calls for a in attn)  # 1 per layer after the forward
        return grad

    module.train()
    module.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    o2m = module(batch)["o2m"]
    o2m["pred_logits"].register_hook(before_backward)
    parts = [o2m["pred_logits"], o2m["pred_boxes"], o2m["pred_masks"].dense()]
    parts += [aux[k] for aux in o2m["aux_outputs"] for k in ("pred_logits", "pred_boxes")]
    ckpt_loss = sum((p * torch.linspace(-1, 1, p.numel()).view_as(p)).sum() for p in parts)
    ckpt_loss.backward()
    assert dac_calls == [1] * len(attn)
    assert [a._sam3lora_dac_calls for a in attn] == [2] * len(attn), "the recomputation lost the DAC keyword"
    ckpt_grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    torch.testing.assert_close(ckpt_loss.detach(), plain_loss, rtol=1e-6, atol=1e-6)
    assert ckpt_grads.keys() == plain_grads.keys()
    assert any("detr_decoder.layers.0.text_cross_attn" in n for n in plain_grads)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_perf_settings_validate_their_values() -> None:
    perf = functools.partial(defaults, "module/default.perf")
    assert perf(activation_checkpointing=True).checkpoint_components == ["vision_encoder", "text_encoder"]
    assert perf(activation_checkpointing=["text_encoder"]).checkpoint_components == ["text_encoder"]
    assert perf(cache_vision_features=True).cache_vision_features == "memory"
    heads = ["detr_encoder", "detr_decoder", "mask_decoder"]
    assert perf(activation_checkpointing=heads).checkpoint_components == heads
    assert perf(activation_checkpointing="auto").checkpoint_components == []  # planned on the first batch
    for bad in (dict(activation_checkpointing=["pixel_decoder"]), dict(activation_checkpointing="all"),
                dict(cache_vision_features="ram"), dict(base_dtype="int8"), dict(memory_budget_gb=0),
                dict(cache_vision_features="disk"), dict(vision_cache_dtype="int8")):
        with pytest.raises(ValueError, match="module.perf"):
            perf(**bad)


# ----------------------------------------------------------------------------------------------- checkpointing auto

#: a made-up table (bytes and FLOPs per image at 224 px, fp32, 4 prompts) whose best choice is known
AUTO_TABLE = {"image_size": 224, "prompts": 4, "dtype": "float32", "presets": {"balanced": {
    "plain": {"vision_encoder": 10e6, "detr_encoder": 10e6, "detr_decoder": 10e6, "mask_decoder": 40e6, "loss": 5e6},
    "checkpointed": {"vision_encoder": 1e6, "detr_encoder": 1e6, "detr_decoder": 1e6, "mask_decoder": 5e6,
                     "loss": 5e6},
    "forward_flops": {"vision_encoder": 100e9, "detr_encoder": 10e9, "detr_decoder": 20e9, "mask_decoder": 50e9},
}}}


def test_auto_checkpointing_takes_the_cheapest_set_that_fits() -> None:
    from sam3lora.perf.memory_plan import PEAK_FACTOR, MemoryPlanError, MemoryTable, choose, estimate_bytes

    table = MemoryTable(**AUTO_TABLE)
    f32 = torch.float32
    need = {c: PEAK_FACTOR * estimate_bytes(table, "balanced", c, 2, 8, 224, f32)
            for c in [(), ("detr_encoder", "detr_decoder"), ("mask_decoder",)]}
    assert need[()] == PEAK_FACTOR * 2 * 75e6  # 2 images, 4 rows each, as measured
    # bfloat16 halves it, 448 px quadruples it, 8 rows per image double everything but the vision encoder
    assert estimate_bytes(table, "balanced", (), 2, 8, 224, torch.bfloat16) == need[()] / PEAK_FACTOR / 2
    assert estimate_bytes(table, "balanced", (), 2, 8, 448, f32) == 4 * need[()] / PEAK_FACTOR
    assert estimate_bytes(table, "balanced", (), 2, 16, 224, f32) == 2 * (75e6 + 65e6)
    assert choose(table, "balanced", need[()], 2, 8, 224, f32).components == ()  # fits as it is: no recompute
    # 18 MB per image must go: the two DETR stacks (30 GFLOP) beat the mask decoder (50) and the vision encoder
    plan = choose(table, "balanced", need["detr_encoder", "detr_decoder"], 2, 8, 224, f32)
    assert plan.components == ("detr_encoder", "detr_decoder") and plan.fits and plan.cost_flops == 2 * 30e9
    assert choose(table, "balanced", need[("mask_decoder",)], 2, 8, 224, f32).components == ("mask_decoder",)
    hopeless = choose(table, "balanced", 1e6, 2, 8, 224, f32)
    assert not hopeless.fits and len(hopeless.components) == 4 and "NOT fit" in hopeless.describe()
    with pytest.raises(MemoryPlanError, match="no row for preset 'full'"):
        choose(table, "full", 1e9, 2, 8, 224, f32)
    shipped = MemoryTable.load()  # the measured table in the package: every preset, every component
    assert set(shipped.presets) == {"minimal", "balanced", "full"}
    assert set(shipped.presets["balanced"]["forward_flops"]) >= set(CHECKPOINTABLE)


def test_auto_checkpointing_counts_the_text_encoder_per_distinct_text() -> None:
    """The text encoder runs once per distinct prompt of a batch and its input does not grow with the image: its
    bytes and recompute FLOPs scale with the distinct texts, not with the rows or the image area."""
    from sam3lora.perf.memory_plan import MemoryTable, choose, estimate_bytes

    full = {"plain": {"text_encoder": 8e6, "mask_decoder": 4e6}, "checkpointed": {"text_encoder": 0.0,
            "mask_decoder": 4e6}, "forward_flops": {"text_encoder": 4e9, "mask_decoder": 1e9}}
    table = MemoryTable(224, 4, "float32", {"full": full})
    f32 = torch.float32
    # 2 images x 4 rows that ask 2 distinct texts: a quarter of the text bytes of 8 distinct rows
    assert estimate_bytes(table, "full", (), 2, 8, 224, f32) == 2 * (8e6 + 4e6)
    assert estimate_bytes(table, "full", (), 2, 8, 224, f32, texts=2) == 2 * (8e6 / 4 + 4e6)
    assert estimate_bytes(table, "full", (), 2, 8, 448, f32, texts=2) == 2 * (8e6 / 4 + 4 * 4e6)
    plan = choose(table, "full", 1.0, 2, 8, 448, f32, texts=2)  # nothing fits: every useful component
    assert plan.components == ("text_encoder",) and plan.cost_flops == 2 * 4e9 / 4  # no area factor


def test_memory_table_counts_the_text_encoder_per_distinct_text() -> None:
    """A measured step that encoded 3 distinct texts for 4 rows gives the table 4/3 of its text bytes and FLOPs
    (the table's rows are distinct texts); a record without ``texts`` (one encoder pass per row) is taken as is."""
    from sam3lora.perf.memory_plan import table_from_records

    def record(ckpt: bool | list[str], text_gb: float, **extra: int) -> dict:
        return {"status": "ok", "ckpt": ckpt, "preset": "full", "base_dtype": "float32", "precision": "fp32",
                "prompts": 4, "rows": 4, **extra,
                "saved_gb_per_image_by_component": {"text_encoder": text_gb, "mask_decoder": 0.2},
                "forward_flops_per_image": {"text_encoder": 3e9, "mask_decoder": 1e9}}

    table = table_from_records([record(False, 0.3, texts=3), record(list(CHECKPOINTABLE), 0.03, texts=3)], 336, "t")
    full = table.presets["full"]
    assert full["plain"] == pytest.approx({"text_encoder": 0.4e9, "mask_decoder": 0.2e9})
    assert full["checkpointed"]["text_encoder"] == pytest.approx(0.04e9)
    assert full["forward_flops"] == pytest.approx({"text_encoder": 4e9, "mask_decoder": 1e9})
    old = table_from_records([record(False, 0.3), record(list(CHECKPOINTABLE), 0.03)], 336, "t")
    assert old.presets["full"]["plain"]["text_encoder"] == pytest.approx(0.3e9)


def test_auto_checkpointing_plans_on_the_first_batch_and_keeps_the_gradients(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import json

    from sam3lora.perf import memory_plan

    path = tmp_path / "table.json"
    path.write_text(json.dumps(AUTO_TABLE))
    monkeypatch.setattr(memory_plan, "TABLE", path)
    module = build_module("lora=balanced", "++lora.init=false")
    batch = batch_for(module, images=2, prompts=4)
    plain_loss, plain_grads = loss_and_grads(module, batch)
    table = memory_plan.MemoryTable.load(path)
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    need = memory_plan.PEAK_FACTOR * memory_plan.estimate_bytes(
        table, "balanced", ("detr_encoder", "detr_decoder"), 2, batch.num_rows, 224, torch.float32)
    budget = need + trainable * memory_plan.TRAINABLE_STATE_BYTES
    monkeypatch.setattr(memory_plan, "free_memory", lambda device: budget / (1 - memory_plan.RESERVE))  # injected
    module.configure_perf(defaults("module/default.perf", activation_checkpointing="auto"))
    assert checkpointed_components(module.model) == []
    with caplog.at_level("INFO"):
        auto_loss, auto_grads = loss_and_grads(module, batch)
    assert module.checkpoint_plan.components == ("detr_encoder", "detr_decoder")
    assert checkpointed_components(module.model) == ["detr_encoder", "detr_decoder"]
    assert "activation_checkpointing auto: detr_encoder, detr_decoder" in caplog.text
    assert_same_step(auto_loss, auto_grads, plain_loss, plain_grads)
    again_loss, _ = loss_and_grads(module, batch)  # planned once
    assert module.checkpoint_plan.components == ("detr_encoder", "detr_decoder")
    torch.testing.assert_close(again_loss, plain_loss, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------- lazy masks


class OutputShapes(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the shape of every tensor an op returns."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: set[tuple[int, ...]] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.shapes.add(tuple(t.shape))
        return out


def test_a_training_step_forms_only_the_matched_masks_with_the_dense_loss_and_gradients() -> None:
    """In training the (R,Q,h,w) mask logits of both query sets (one-to-one and DAC) are never formed, nor their
    gradient; the loss and every gradient equal those of the same forward with the dense masks."""
    from sam3lora.model.mask_product import MaskProduct

    module = build_module("lora=balanced", "++lora.init=false")
    assert module.use_dac
    batch = batch_for(module, images=2, prompts=3)
    module.train()
    torch.manual_seed(0)
    with OutputShapes() as seen:
        outputs = module(batch)
        loss = module.criterion(outputs, batch.targets)["loss"]
        loss.backward(retain_graph=True)  # the dense reference below goes through the same forward
    masks = outputs["pred_masks"]
    assert isinstance(masks, MaskProduct) and isinstance(outputs["o2m"]["pred_masks"], MaskProduct)
    rows, queries, h, w = masks.shape
    assert (rows, queries, h, w) not in seen.shapes and (rows, queries, h * w) not in seen.shapes
    lazy_grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    module.zero_grad(set_to_none=True)
    dense = {**outputs, "pred_masks": masks.dense(),
             "o2m": {**outputs["o2m"], "pred_masks": outputs["o2m"]["pred_masks"].dense()}}
    dense_loss = module.criterion(dense, batch.targets)["loss"]
    dense_loss.backward()
    torch.testing.assert_close(loss, dense_loss)
    dense_grads = {n: p.grad for n, p in module.named_parameters() if p.grad is not None}
    assert lazy_grads.keys() == dense_grads.keys()
    for name, grad in dense_grads.items():  # float32 summation order: within 1e-5 of each tensor's largest entry
        assert (lazy_grads[name] - grad).abs().max() <= 1e-5 * grad.abs().max(), name
    module.eval()  # outside training the decoder forms them, as prediction needs
    with torch.no_grad(), OutputShapes() as seen:
        assert module(batch)["pred_masks"].shape == (rows, queries, h, w)
    assert (rows, queries, h, w) in seen.shapes


# ----------------------------------------------------------------------------------------------- bf16 base


def test_bf16_base_with_fp32_adapters_trains_a_step() -> None:
    module = build_module("lora=balanced", "model.dtype=bfloat16", "++lora.modules_to_save=[dot_product_scoring]")
    trainable = {n: p for n, p in module.named_parameters() if p.requires_grad}
    frozen = [p for p in module.parameters() if not p.requires_grad and p.is_floating_point()]
    assert any("lora_" in n for n in trainable) and any("modules_to_save" in n for n in trainable)
    assert {p.dtype for p in trainable.values()} == {torch.float32}
    assert sum(p.numel() for p in frozen if p.dtype == torch.bfloat16) > 0.95 * sum(p.numel() for p in frozen)
    before = {n: p.detach().clone() for n, p in trainable.items()}
    optimizer = module.optimizer_factory(module.param_groups())
    batch = batch_for(module)
    loss, grads = loss_and_grads(module, batch)  # no trainer autocast: the module autocasts to the base dtype
    assert torch.isfinite(loss) and loss > 0
    assert grads.keys() == trainable.keys() and all(g.dtype == torch.float32 for g in grads.values())
    optimizer.step()
    changed = {n for n, p in trainable.items() if not torch.equal(p, before[n])}
    # Text-only rows give the geometry encoder one unmasked token (its CLS; the padding box is masked): a softmax
    # over one key has no gradient for its queries and keys, so only those LoRA weights may stay (exactly) still.
    still = set(trainable) - changed
    assert all(".geometry_encoder." in n and ("q_proj" in n or "k_proj" in n) for n in still), sorted(still)
    assert all(grads[n].abs().max() == 0 for n in still) and len(changed) > 0.95 * len(trainable)
    assert {p.dtype for p in trainable.values()} == {torch.float32}
    with torch.autocast("cpu", dtype=torch.bfloat16):  # trainer.precision=bf16-mixed on top of it
        mixed, _ = loss_and_grads(module, batch)
    assert torch.isfinite(mixed)


# ----------------------------------------------------------------------------------------------- the app


@pytest.fixture
def job(tmp_path: Path) -> Iterator[Callable[..., DictConfig]]:
    """The config of one training job as ``@hydra.main`` hands it to the app (2 + 2 synthetic images)."""
    root = tmp_path / "data"
    write_synthetic(root, train=2, val=2, size=224, seed=0)

    def make(*overrides: str) -> DictConfig:
        with initialize_config_dir(config_dir=CONF, version_base="1.3"):
            cfg = compose("train", return_hydra_config=True, overrides=[
                f"data.root={root}", f"paths.root_dir={tmp_path}", "data.num_workers=0", "data.batch_size=2",
                "data.prompts.max_prompts_per_image=3", "trainer.accelerator=cpu", *overrides])
        (tmp_path / "job").mkdir(exist_ok=True)
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(tmp_path / "job")
            cfg.hydra.job.num = 0
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            del cfg["hydra"]
        return cfg

    yield make
    HydraConfig.instance().cfg = None


def test_app_refuses_a_vision_cache_with_random_transforms_before_any_validation(job) -> None:
    cfg = job("debug=fdr", "lora=minimal", "module.perf.cache_vision_features=memory")
    with pytest.raises(ConfigError, match=r"module.perf.cache_vision_features .*random op\(s\) \['OneOf"):
        run(cfg)


def test_app_trains_with_both_caches_and_checkpointing(job) -> None:
    cfg = job("debug=fdr", "lora=minimal", "module.perf.cache_vision_features=memory",
              "module.perf.cache_text_features=true", "module.perf.activation_checkpointing=true",
              "data.train_transforms=${data.val_transforms}")
    metric = run(cfg)
    assert metric is not None and 0.0 <= metric <= 1.0
