"""``Sam3LoRAModule`` in process: forward (aux outputs, shared vision pass), a training step, checkpoints, param groups.

Everything runs on the tiny preset with a batch from the real ``Sam3DataModule`` over a small synthetic set;
the module is built from the composed ``conf/train.yaml`` exactly as the training app builds it. Torch runs on
one thread here: the tensors are small, and two threads on a 2-core machine that others share are many times
slower than one (OpenMP threads wait for a busy core).
"""

from __future__ import annotations

import dataclasses
import io
import tempfile
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import save_lightning_checkpoint
from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig
from PIL import Image
from torch import nn

from sam3lora.adapter import recorded_lora
from sam3lora.config import defaults
from sam3lora.lora import apply_lora, component_of
from sam3lora.model import load_model
from sam3lora.training.module import SOURCE_KWARG, Sam3LoRAModule

pytestmark = pytest.mark.usefixtures("one_thread")
CONF = str(Path(__file__).resolve().parents[1] / "conf")
SMALL_DATA = ["data.num_workers=0", "data.batch_size=2", "data.prompts.max_prompts_per_image=3"]


def compose_cfg(root: Path, *overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("train", overrides=[f"data.root={root}", *SMALL_DATA, *overrides])


def build_module(cfg: DictConfig, seed: int | None = None) -> Sam3LoRAModule:
    """The module exactly as ``sam3lora.training.run_training.run`` builds it (``seed``: the tiny base's seed)."""
    model_kwargs = dict(cfg.model) | ({} if seed is None else {"seed": seed})
    model, _ = load_model(**model_kwargs)
    lora = instantiate(cfg.lora)
    return instantiate(cfg.module, model=apply_lora(model, lora), criterion=instantiate(cfg.loss), lora_settings=lora)


@pytest.fixture(scope="module")
def batches(synthetic_root: Path) -> dict:
    """One training and one validation batch from the real data module (augmented / stretched)."""
    cfg = compose_cfg(synthetic_root)
    _, processor = load_model(**cfg.model)
    datamodule = instantiate(cfg.data, processor=processor)
    datamodule.setup("fit")
    train, val = next(iter(datamodule.train_dataloader())), next(iter(datamodule.val_dataloader()))
    for batch in (train, val):  # the tests below need both kinds of rows and several rows per image
        sizes = [len(t["boxes"]) for t in batch.targets]
        assert any(sizes) and not all(sizes), sizes
        assert batch.num_rows > batch.pixel_values.shape[0]
    return {"train": train, "val": val, "processor": processor}


def plain_module(cfg: DictConfig) -> Sam3LoRAModule:
    """A module around the bare ``Sam3Model`` (no PEFT), every parameter trainable: gradients everywhere."""
    model, _ = load_model(**cfg.model)
    model.requires_grad_(True)
    return defaults("module/default", model=model, criterion=instantiate(cfg.loss), optimizer={"lr": 1e-4},
                    scheduler={"name": "constant", "warmup_steps": 0})


def repeated_image_outputs(model: nn.Module, batch) -> object:
    """HF's own path: every row carries its own copy of its image."""
    return model(
        pixel_values=batch.pixel_values[batch.image_index],
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        input_boxes=batch.input_boxes,
        input_boxes_labels=batch.input_boxes_labels,
    )


def grads_of(module: nn.Module, scalar: torch.Tensor) -> dict[str, torch.Tensor]:
    module.zero_grad(set_to_none=True)
    scalar.backward(retain_graph=True)
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


# ----------------------------------------------------------------------------------------------- forward


def test_aux_outputs_equal_hf_per_layer_values_and_gradients(synthetic_root: Path, batches: dict) -> None:
    """Each aux output equals what HF computes for that decoder layer, in value and in gradient.

    HF's outputs for layer i are the final outputs of the same model with its decoder cut after layer i (the
    decoder is sequential, and Sam3Model.forward builds boxes, logits and presence from the last layer it has).
    """
    batch = batches["train"]
    module = plain_module(compose_cfg(synthetic_root))
    model = module.model
    decoder = model.detr_decoder
    layers = decoder.layers
    outputs = module(batch)
    aux = outputs["aux_outputs"]
    assert len(aux) == len(layers) - 1 >= 2
    g = torch.Generator().manual_seed(0)
    for i, layer_out in enumerate(aux):
        decoder.layers = nn.ModuleList(list(layers)[: i + 1])
        try:
            ref = repeated_image_outputs(model, batch)
        finally:
            decoder.layers = layers
        for key in ("pred_logits", "pred_boxes", "presence_logits"):
            torch.testing.assert_close(layer_out[key], getattr(ref, key), rtol=0, atol=1e-5, msg=f"aux[{i}] {key}")
        # a random linear probe of the three outputs: its gradient reaches every parameter they depend on
        weights = {k: torch.randn(getattr(ref, k).shape, generator=g) for k in ("pred_logits", "pred_boxes")}
        weights["presence_logits"] = torch.randn(ref.presence_logits.shape, generator=g)

        def probe(out, get, weights=weights):
            return sum((get(out, k) * w).sum() for k, w in weights.items())

        ours = grads_of(module, probe(layer_out, lambda o, k: o[k]))
        theirs = grads_of(module, probe(ref, getattr))
        # a parameter the layer does not depend on has no gradient on HF's side and, through the stacked
        # per-layer tensors, a zero one on ours: compare values, absent = 0
        assert any(n.startswith("model.detr_decoder.box_head") for n in theirs)
        for name in ours.keys() | theirs.keys():
            a = ours.get(name, torch.zeros_like(theirs.get(name, ours.get(name))))
            b = theirs.get(name, torch.zeros_like(a))
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=f"aux[{i}] grad of {name}")


def test_final_outputs_equal_the_repeated_image_path_and_vision_runs_once_per_image(
    synthetic_root: Path, batches: dict
) -> None:
    batch = batches["val"]
    # random B: the adapters (vision encoder included) change the outputs, so the comparison covers them
    module = build_module(compose_cfg(synthetic_root, "lora=full", "++lora.init=false"))
    calls: list[int] = []
    vision = module.base_model.vision_encoder
    handle = vision.register_forward_hook(lambda _m, args, _o: calls.append(args[0].shape[0]))
    with torch.no_grad():
        ours = module(batch)
        assert calls == [batch.pixel_values.shape[0]]  # one vision pass over the I images, not the R rows
        theirs = repeated_image_outputs(module.model, batch)
        base_out = module.model.get_base_model()
    handle.remove()
    assert calls[-1] == batch.num_rows
    for key in ("pred_logits", "pred_boxes", "presence_logits", "pred_masks", "semantic_seg"):
        torch.testing.assert_close(ours[key], getattr(theirs, key), rtol=0, atol=1e-5, msg=key)
    with torch.no_grad(), module.model.disable_adapter():
        plain = repeated_image_outputs(base_out, batch)
    assert (plain.pred_logits - theirs.pred_logits).abs().max() > 1e-3  # the adapters were really in the path


# ----------------------------------------------------------------------------------------------- training


def test_training_step_reduces_the_loss_and_only_adapters_get_gradients(synthetic_root: Path, batches: dict) -> None:
    batch = batches["train"]
    torch.manual_seed(0)  # adapter init and the DETR dropout (0.1) draw from the global generator
    module = build_module(compose_cfg(synthetic_root, "lora=balanced", "module.optimizer.lr=5e-3"))
    module.train()
    optimizer = module.optimizer_factory(module.param_groups())
    trainable = module.trainable_names()
    assert trainable and all("lora_" in n for n in trainable)
    losses = []
    for step in range(8):
        optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # self.log without a Trainer only warns
            warnings.simplefilter("ignore")
            loss = module.training_step(batch, step)
        loss.backward()
        if step == 0:
            with_grad = {n for n, p in module.named_parameters() if p.grad is not None}
            assert with_grad == trainable  # every adapter weight, and nothing frozen
            assert all(not p.requires_grad for n, p in module.named_parameters() if n not in trainable)
        optimizer.step()
        losses.append(float(loss))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.9 * losses[0], losses
    assert min(losses[4:]) < min(losses[:4]), losses


# ----------------------------------------------------------------------------------------------- checkpoints


def saved_checkpoint(module: Sam3LoRAModule) -> dict:
    """The checkpoint Lightning writes for ``module`` (``on_save_checkpoint`` included), as read back."""
    with tempfile.TemporaryDirectory() as tmp:
        return save_lightning_checkpoint(module, Path(tmp) / "module.ckpt")


def nbytes(obj: object) -> int:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.tell()


@pytest.fixture(scope="module")
def minimal_checkpoint(synthetic_root: Path) -> tuple[dict, dict]:
    """A checkpoint of the minimal preset with non-trivial adapter weights, and the full state dict's size."""
    module = build_module(compose_cfg(synthetic_root, "lora=minimal"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    full = {k: v.clone() for k, v in module.state_dict().items()}
    return saved_checkpoint(module), full


def test_checkpoint_keeps_only_trainable_weights(synthetic_root: Path, minimal_checkpoint: tuple[dict, dict]) -> None:
    checkpoint, full = minimal_checkpoint
    state = checkpoint["state_dict"]
    assert state and all("lora_" in k for k in state)
    assert set(checkpoint["sam3lora"]["trainable"]) == set(state)
    assert checkpoint["hyper_parameters"]["lora_settings"]["rank"] == 8  # the preset's settings travel with it
    assert checkpoint["sam3lora"]["base"]["weights"] is not None
    size_mb, full_mb = nbytes(checkpoint) / 2**20, nbytes(full) / 2**20
    trainable_mb = sum(v.numel() * v.element_size() for v in state.values()) / 2**20
    assert size_mb < full_mb / 10, (size_mb, full_mb)
    assert size_mb < 1.2 * trainable_mb + 0.05  # the weights themselves plus a little bookkeeping


def test_checkpoint_round_trip_restores_the_adapters(
    synthetic_root: Path, minimal_checkpoint: tuple[dict, dict]
) -> None:
    checkpoint, _ = minimal_checkpoint
    module = build_module(compose_cfg(synthetic_root, "lora=minimal"))
    module.on_load_checkpoint(checkpoint)
    result = module.load_state_dict(checkpoint["state_dict"], strict=False)
    assert not result.unexpected_keys
    assert not set(result.missing_keys) & module.trainable_names()
    restored = module.state_dict()
    for key, value in checkpoint["state_dict"].items():
        torch.testing.assert_close(restored[key], value, rtol=0, atol=0)


def test_load_from_checkpoint_rebuilds_the_module_from_its_hyperparameters(
    synthetic_root: Path, minimal_checkpoint: tuple[dict, dict], tmp_path: Path
) -> None:
    """Lightning's ``load_from_checkpoint`` (what the predictor runs on a ``.ckpt``): the settings come back from the
    checkpoint's plain hyperparameters (``weights_only`` loading), the weights through ``on_load_checkpoint``'s
    checks, and a checkpoint of another base is refused naming the file."""
    checkpoint, _ = minimal_checkpoint
    path = tmp_path / "minimal.ckpt"
    torch.save(checkpoint, path)
    cfg = compose_cfg(synthetic_root, "lora=minimal")
    built = build_module(cfg)
    model, _ = load_model(**cfg.model)
    peft_model = apply_lora(model, recorded_lora(checkpoint, path))
    loaded = Sam3LoRAModule.load_from_checkpoint(
        path, map_location="cpu", weights_only=True, model=peft_model, criterion=None, optimizer=None,
        **{SOURCE_KWARG: str(path)},
    )
    assert loaded.model is peft_model and loaded.lora_settings == built.lora_settings
    assert (loaded.schedule, loaded.metric_settings, loaded.perf) == (built.schedule, built.metric_settings, built.perf)
    restored = loaded.state_dict()
    for key, value in checkpoint["state_dict"].items():
        torch.testing.assert_close(restored[key], value, rtol=0, atol=0)
    with pytest.raises(ValueError, match="Sam3LoRAModule was built without an optimizer"):
        loaded.configure_optimizers()
    other, _ = load_model(**(dict(cfg.model) | {"seed": 1}))
    with pytest.raises(ValueError, match=rf"^{path}: trained on base .*weights"):
        Sam3LoRAModule.load_from_checkpoint(path, weights_only=True, model=apply_lora(other, loaded.lora_settings),
                                            criterion=None, optimizer=None, **{SOURCE_KWARG: str(path)})


def test_checkpoint_from_another_base_is_refused(synthetic_root: Path, minimal_checkpoint: tuple[dict, dict]) -> None:
    checkpoint, _ = minimal_checkpoint
    other = build_module(compose_cfg(synthetic_root, "lora=minimal"), seed=1)  # same architecture, other weights
    with pytest.raises(ValueError, match=r"trained on base .*weights"):
        other.on_load_checkpoint(checkpoint)


def test_checkpoint_of_another_preset_is_refused(synthetic_root: Path, minimal_checkpoint: tuple[dict, dict]) -> None:
    checkpoint, _ = minimal_checkpoint
    full = build_module(compose_cfg(synthetic_root, "lora=full"))
    with pytest.raises(ValueError, match=r"lacks \d+ trainable weight\(s\).*another LoRA preset"):
        full.on_load_checkpoint(checkpoint)
    # the other way round: every weight the balanced preset needs is in a full-preset checkpoint, plus many more
    balanced = build_module(compose_cfg(synthetic_root, "lora=balanced"))
    bigger = saved_checkpoint(full)
    assert balanced.trainable_names() < set(bigger["state_dict"])
    with pytest.raises(ValueError, match=r"\d+ weight\(s\) this model does not train.*another LoRA preset"):
        balanced.on_load_checkpoint(bigger)


def test_checkpoint_not_written_by_sam3lora_is_refused(synthetic_root: Path) -> None:
    module = build_module(compose_cfg(synthetic_root, "lora=minimal"))
    with pytest.raises(ValueError, match="^checkpoint: checkpoint was not written by sam3lora"):
        module.on_load_checkpoint({"state_dict": module.state_dict()})
    module._trainer = SimpleNamespace(ckpt_path="runs/a/last.ckpt")  # a resume: the message names the file
    with pytest.raises(ValueError, match="^runs/a/last.ckpt: checkpoint was not written by sam3lora"):
        module.on_load_checkpoint({"state_dict": module.state_dict()})


# ----------------------------------------------------------------------------------------------- optimiser


def optimizer_groups(module: Sam3LoRAModule) -> list[tuple[str, dict]]:
    """(parameter name, its resolved optimizer group) for every parameter the optimiser steps."""
    optimizer = module.optimizer_factory(module.param_groups())
    names = {id(p): n for n, p in module.model.named_parameters()}
    return [(names[id(p)], group) for group in optimizer.param_groups for p in group["params"]]


def test_biases_norms_and_1d_parameters_get_no_weight_decay(synthetic_root: Path) -> None:
    # DoRA magnitudes (1-D) and a fully trained module with biases and a LayerNorm
    overrides = ["lora=minimal", "++lora.variant=dora", "++lora.modules_to_save=[dot_product_scoring]"]
    cfg = compose_cfg(synthetic_root, *overrides)
    module = build_module(cfg)
    pairs = optimizer_groups(module)
    params = dict(module.model.named_parameters())
    assert sorted(n for n, _ in pairs) == sorted(n for n, p in params.items() if p.requires_grad)  # each once
    no_decay = {n for n, g in pairs if g["weight_decay"] == 0.0}
    expected = {n for n, _ in pairs if params[n].ndim < 2 or n.endswith(".bias") or "norm" in n}
    assert no_decay == expected
    assert any("lora_magnitude_vector" in n for n in no_decay)
    assert any("text_mlp_out_norm" in n for n in no_decay) and any(n.endswith(".bias") for n in no_decay)
    decay = [g["weight_decay"] for n, g in pairs if n not in no_decay]
    assert decay and set(decay) == {cfg.module.optimizer.weight_decay}
    assert all(params[n].ndim == 2 for n, _ in pairs if n not in no_decay)


def test_component_lr_sets_the_learning_rate_per_component(synthetic_root: Path) -> None:
    overrides = ["lora=balanced", "++module.component_lr={detr_decoder:1.0e-5,vision_encoder:2.0e-4}"]
    cfg = compose_cfg(synthetic_root, *overrides)
    module = build_module(cfg)
    pairs = optimizer_groups(module)
    by_component: dict[str, set[float]] = {}
    for name, group in pairs:
        by_component.setdefault(component_of(name), set()).add(group["lr"])
    assert by_component["detr_decoder"] == {1e-5}
    assert by_component["vision_encoder"] == {2e-4}
    others = {c for c in by_component if c not in ("detr_decoder", "vision_encoder")}
    assert others and all(by_component[c] == {cfg.module.optimizer.lr} for c in others)


def test_unknown_component_in_component_lr_is_an_error(synthetic_root: Path) -> None:
    cfg = compose_cfg(synthetic_root, "lora=minimal", "++module.component_lr={detr_decodr:1.0e-5}")
    with pytest.raises(InstantiationException) as info:  # at build time, before any training or validation
        build_module(cfg)
    assert isinstance(info.value.__cause__, ValueError)
    assert "module.component_lr" in str(info.value.__cause__) and "detr_decodr" in str(info.value.__cause__)
    assert "detr_decoder" in str(info.value.__cause__)  # the known components are listed


def test_an_empty_validation_batch_logs_val_loss_with_weight_zero(synthetic_root: Path, batches: dict) -> None:
    """A batch of skipped bad samples (no rows) runs no model, but logs val/loss with batch size 0, so DDP ranks
    always reduce the same keys and the epoch's mean is that of the other batches."""
    module = build_module(compose_cfg(synthetic_root, "lora=minimal"))
    val = batches["val"]
    empty = dataclasses.replace(val, pixel_values=val.pixel_values[:0], image_index=val.image_index[:0],
                                input_ids=val.input_ids[:0], attention_mask=val.attention_mask[:0],
                                input_boxes=val.input_boxes[:0], input_boxes_labels=val.input_boxes_labels[:0],
                                targets=[], prompts=[], category_ids=val.category_ids[:0], image_ids=val.image_ids[:0],
                                orig_sizes=val.orig_sizes[:0])
    logged: list[tuple[str, float, int]] = []
    module.log = lambda name, value, batch_size=None, **kw: logged.append((name, float(value), batch_size))
    assert module.validation_step(empty, 0) is None
    assert logged == [("val/loss", 0.0, 0)]


def test_training_forward_equals_the_prediction_forward(synthetic_root: Path, batches: dict) -> None:
    """One SAM 3 contract: the module (training code: eval and training mode, DAC hooks, text-feature cache) and
    ``sam3lora.sam3`` (prediction, the model card's snippet) give identical outputs for the same weights and batch,
    and tokenise prompts and pad text-only rows the same way."""
    from sam3lora import sam3 as plain

    module = build_module(compose_cfg(synthetic_root))
    assert module.use_dac  # training steps run the DAC hooks and the o2m copy on top of the shared forward
    batch = batches["val"]
    scores, boxes, masks = plain.sam3_forward(module.model, batch.model_inputs())
    off = module.perf  # the configured switches: no feature cache
    assert not off.cache_text_features
    text_cache = dataclasses.replace(off, cache_text_features=True)
    for training, perf in ((False, off), (True, off), (False, text_cache)):
        module.train(training)
        for dropout in (m for m in module.modules() if isinstance(m, nn.Dropout)):
            dropout.eval()  # training mode (DAC on), without the randomness
        module.configure_perf(perf)
        with torch.no_grad():
            ours = module(batch)
        assert ("o2m" in ours) == training
        assert torch.equal(scores, plain.sam3_scores(ours["pred_logits"], ours["presence_logits"]))
        # in training the masks stay a product of the decoder's two factors, formed where the loss indexes them
        ours_masks = ours["pred_masks"].dense() if training else ours["pred_masks"]
        assert torch.equal(boxes, ours["pred_boxes"]) and torch.equal(masks, ours_masks)
    tokens = batches["processor"].tokenizer(list(batch.prompts), padding="max_length", max_length=plain.TEXT_LENGTH,
                                            truncation=True, return_tensors="pt")
    assert torch.equal(tokens["input_ids"], batch.input_ids)
    # a text-only training row is the row prediction builds for that text: same tokens, one padding box
    r = int(torch.nonzero((batch.input_boxes_labels == plain.PAD_LABEL).all(-1))[0])
    image = Image.new("RGB", (64, 48))
    row = plain.sam3_inputs(batches["processor"], [image], [(batch.prompts[r], [])])
    assert torch.equal(row["input_ids"][0], batch.input_ids[r]) and row["input_boxes_labels"].tolist() == [[-10]]
    assert torch.equal(row["input_boxes"][0, 0], torch.zeros(4))
