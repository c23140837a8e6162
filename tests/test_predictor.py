"""Sam3LoRAPredictor: shapes, prompts, batching, the shared vision pass, adapters (dirs, checkpoints, several)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import save_lightning_checkpoint
from PIL import Image
from torch import nn

from sam3lora.adapter import AdapterMismatchError, save_adapter
from sam3lora.config import defaults
from sam3lora.inference import AdapterLoadError, PredictorError, PromptError, Sam3LoRAPredictor
from sam3lora.lora import LoraSettings, apply_lora
from sam3lora.model import load_model

PROMPTS = ["red circle", "blue square", "green triangle"]


def lora_settings() -> LoraSettings:
    """Random-B adapters (init=False) with a large scale, so adapters visibly change the outputs."""
    return defaults(
        "lora/_base", init=False, rank=4, alpha=16, vision_encoder={"enabled": True}, detr_decoder={"enabled": True},
        mask_decoder={"enabled": True},
    )


def make_adapter(path, seed: int, base_seed: int = 0):
    """Save a random adapter for the tiny preset of ``base_seed``; returns the PEFT model it came from."""
    model, _ = load_model("tiny", dtype="float32", seed=base_seed)
    torch.manual_seed(seed)
    peft_model = apply_lora(model, lora_settings()).eval()
    save_adapter(peft_model, path, lora_settings())
    return peft_model


def make_checkpoint(path, peft_model) -> None:
    """A checkpoint as a training run writes it: Lightning's dump (the hyperparameters, LoRA settings among them),
    then ``Sam3LoRAModule.on_save_checkpoint`` (trainable weights + base)."""
    module = defaults("module/default", model=peft_model, criterion=nn.Module(), lora_settings=lora_settings())
    save_lightning_checkpoint(module, path)


def images(n: int = 3, seed: int = 0) -> list[Image.Image]:
    """Non-square random RGB images of different sizes."""
    rng = np.random.default_rng(seed)
    sizes = [(90, 130), (120, 100), (64, 64), (150, 110)]
    return [Image.fromarray(rng.integers(0, 256, (*sizes[i % 4], 3), dtype=np.uint8)) for i in range(n)]


def mismatch(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fraction of mask pixels that differ (0 for empty mask stacks)."""
    assert a.shape == b.shape
    return float((a != b).sum()) / max(a.numel(), 1)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    a = make_adapter(root / "a", seed=1)
    make_adapter(root / "b", seed=2)
    make_checkpoint(root / "a.ckpt", a)
    return root


@pytest.fixture(scope="module")
def base_predictor():
    return Sam3LoRAPredictor.from_pretrained("tiny")


@pytest.fixture(scope="module")
def predictor_a(adapters):
    """Adapter ``a`` alone, unmerged."""
    return Sam3LoRAPredictor.from_pretrained("tiny", adapters / "a", merge=False)


@pytest.fixture(scope="module")
def multi(adapters):
    """Three adapters on one base: directories ``a`` and ``b``, and ``ck``, the checkpoint of ``a``."""
    return Sam3LoRAPredictor.from_pretrained(
        "tiny", {"a": adapters / "a", "b": adapters / "b", "ck": adapters / "a.ckpt"}
    )


def test_shapes_and_value_ranges_for_text_box_and_both(base_predictor):
    ims = images(2)
    box = [10, 12, 60, 50]
    cases = {
        "text": dict(text=PROMPTS[:2]),
        "box": dict(boxes=[box]),
        "both": dict(text=PROMPTS[0], boxes=[box, [0, 0, 30, 30]]),
    }
    expected_prompts = {"text": PROMPTS[:2], "box": ["visual"], "both": [PROMPTS[0]]}
    outputs = {}
    for case, kwargs in cases.items():
        outputs[case] = results = base_predictor.predict(ims, threshold=0.0, **kwargs)
        assert len(results) == len(ims)
        for im, per_image in zip(ims, results, strict=True):
            assert [r.prompt for r in per_image] == expected_prompts[case]
            for r in per_image:
                n = len(r)
                assert n == 20  # threshold 0 keeps every query of the tiny model
                assert r.masks.dtype == torch.bool and r.masks.shape == (n, im.height, im.width)
                assert r.boxes.shape == (n, 4) and r.scores.shape == (n,)
                assert (r.boxes[:, 0] >= 0).all() and (r.boxes[:, 2] <= im.width).all()
                assert (r.boxes[:, 1] >= 0).all() and (r.boxes[:, 3] <= im.height).all()
                assert (r.boxes[:, 2] >= r.boxes[:, 0]).all() and (r.boxes[:, 3] >= r.boxes[:, 1]).all()
                assert ((r.scores >= 0) & (r.scores <= 1)).all()
                assert (r.scores[:-1] >= r.scores[1:]).all()
    # the exemplar boxes are real inputs: the same text with boxes gives other outputs
    assert not torch.allclose(outputs["text"][0][0].scores, outputs["both"][0][0].scores, atol=1e-5)


def test_threshold_and_input_kinds(base_predictor, tmp_path):
    im = images(1)[0]
    im.save(tmp_path / "x.png")
    # a path, an array and a PIL image of the same picture give the same result
    by_path, by_array, by_pil = base_predictor.predict(
        [str(tmp_path / "x.png"), np.asarray(im), im], text=PROMPTS[0], threshold=0.0
    )
    torch.testing.assert_close(by_path[0].scores, by_pil[0].scores)
    torch.testing.assert_close(by_array[0].scores, by_pil[0].scores)
    all_scores = by_pil[0].scores
    cut = float(all_scores[len(all_scores) // 2])
    kept = base_predictor.predict(im, text=PROMPTS[0], threshold=cut)[0][0]
    assert len(kept) == int((all_scores >= cut).sum()) and (kept.scores >= cut).all()
    none = base_predictor.predict(im, text=PROMPTS[0], threshold=1.0)[0][0]
    assert none.masks.shape == (0, im.height, im.width) and none.boxes.shape == (0, 4)


def test_batches_equal_single_runs(base_predictor):
    ims = images(3)
    kwargs = dict(text=PROMPTS[:2], boxes=[[5, 5, 40, 40]], threshold=0.0)
    batched = base_predictor.predict(ims, batch_size=2, **kwargs)
    for im, per_image in zip(ims, batched, strict=True):
        single = base_predictor.predict(im, batch_size=1, **kwargs)[0]
        for a, b in zip(per_image, single, strict=True):
            torch.testing.assert_close(a.scores, b.scores, atol=1e-5, rtol=0)
            torch.testing.assert_close(a.boxes, b.boxes, atol=1e-3, rtol=0)
            assert mismatch(a.masks, b.masks) < 1e-3


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor:
    return next(v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor))


def test_prompts_of_one_image_share_one_vision_pass(base_predictor):
    vision_batches: list[int] = []
    text_rows: list[int] = []
    model = base_predictor.model
    h1 = model.vision_encoder.register_forward_hook(
        lambda m, a, kw, out: vision_batches.append(_first_tensor(a, kw).shape[0]), with_kwargs=True
    )
    h2 = model.text_encoder.register_forward_hook(
        lambda m, a, kw, out: text_rows.append(_first_tensor(a, kw).shape[0]), with_kwargs=True
    )
    try:
        base_predictor.predict(images(3), text=PROMPTS, threshold=0.5, batch_size=2)
    finally:
        h1.remove()
        h2.remove()
    assert vision_batches == [2, 1]  # one vision pass per batch of images, none per prompt
    assert text_rows == [3, 3]  # the text encoder once per distinct prompt of a batch (sam3.distinct_prompts)


def test_multi_adapter_switching_and_base(adapters, base_predictor, predictor_a, multi):
    im = images(1)[0]
    assert multi.adapters == ["a", "b", "ck"] and multi.merged is None
    outs = {}
    for name in ("a", "b", None):
        outs[name] = multi.predict(im, text=PROMPTS[:2], threshold=0.0, adapter=name)[0]
    for name in ("a", "b"):
        alone = predictor_a if name == "a" else Sam3LoRAPredictor.from_pretrained("tiny", adapters / name, merge=False)
        ref = alone.predict(im, text=PROMPTS[:2], threshold=0.0)[0]
        for x, y in zip(outs[name], ref, strict=True):
            torch.testing.assert_close(x.scores, y.scores, atol=1e-6, rtol=0)
            assert torch.equal(x.masks, y.masks)
    base = base_predictor.predict(im, text=PROMPTS[:2], threshold=0.0)[0]
    for x, y in zip(outs[None], base, strict=True):
        torch.testing.assert_close(x.scores, y.scores, atol=1e-6, rtol=0)
    # the three really differ (so the comparisons above could fail)
    assert not torch.allclose(outs["a"][0].scores, outs["b"][0].scores, atol=1e-4)
    assert not torch.allclose(outs["a"][0].scores, outs[None][0].scores, atol=1e-4)
    with pytest.raises(PredictorError, match="several adapters"):
        multi.predict(im, text=PROMPTS[0])
    with pytest.raises(PredictorError, match="unknown adapter 'c'"):
        multi.predict(im, text=PROMPTS[0], adapter="c")


def _gap_threshold(scores: torch.Tensor) -> float:
    """A threshold in the widest gap between consecutive scores (so tiny numeric noise cannot flip a decision)."""
    s = scores.sort(descending=True).values
    gaps = s[:-1] - s[1:]
    i = int(gaps[: max(len(gaps) // 2, 1)].argmax())
    return float((s[i] + s[i + 1]) / 2)


def test_merged_and_unmerged_give_the_same_instances(adapters, predictor_a):
    im = images(1)[0]
    unmerged = predictor_a
    merged = Sam3LoRAPredictor.from_pretrained("tiny", adapters / "a", merge=True)
    assert merged.merged == "default" and not any("lora" in n for n, _ in merged.model.named_parameters())
    scores = unmerged.predict(im, text=PROMPTS[0], threshold=0.0)[0][0].scores
    threshold = _gap_threshold(scores)
    a = unmerged.predict(im, text=PROMPTS, threshold=threshold)[0]
    b = merged.predict(im, text=PROMPTS, threshold=threshold)[0]
    assert len(a[0]) > 0
    for x, y in zip(a, b, strict=True):
        assert len(x) == len(y)
        torch.testing.assert_close(x.scores, y.scores, atol=1e-3, rtol=0)  # merging rounds differently
        torch.testing.assert_close(x.boxes, y.boxes, atol=5e-2, rtol=0)
        assert mismatch(x.masks, y.masks) < 1e-2  # the tiny model's mask logits sit near 0: rounding flips a few pixels
    with pytest.raises(PredictorError, match="merged"):
        merged.predict(im, text=PROMPTS[0], adapter=None)


def test_lightning_checkpoint_loads_like_the_adapter_dir(adapters, predictor_a, multi):
    im = images(1)[0]
    from_dir = predictor_a
    from_ckpt = Sam3LoRAPredictor.from_pretrained("tiny", adapters / "a.ckpt", merge=False)
    ref = from_dir.predict(im, text=PROMPTS[:2], threshold=0.0)[0]
    for other in (from_ckpt.predict(im, text=PROMPTS[:2], threshold=0.0)[0],
                  multi.predict(im, text=PROMPTS[:2], threshold=0.0, adapter="ck")[0]):
        for x, y in zip(ref, other, strict=True):
            torch.testing.assert_close(x.scores, y.scores, atol=1e-6, rtol=0)
            assert torch.equal(x.masks, y.masks)


def test_checkpoint_missing_a_weight_is_refused(adapters, tmp_path):
    ckpt = torch.load(adapters / "a.ckpt", weights_only=True)
    dropped = next(k for k in ckpt["state_dict"] if "lora_B" in k)
    del ckpt["state_dict"][dropped]
    torch.save(ckpt, tmp_path / "broken.ckpt")
    with pytest.raises(AdapterLoadError, match="lacks"):
        Sam3LoRAPredictor.from_pretrained("tiny", tmp_path / "broken.ckpt")
    ckpt = torch.load(adapters / "a.ckpt", weights_only=True)
    ckpt["sam3lora"]["base"]["architecture"] = "0123456789abcdef"  # as if made on another preset / model
    torch.save(ckpt, tmp_path / "arch.ckpt")
    with pytest.raises(AdapterMismatchError, match="architecture 0123456789abcdef"):
        Sam3LoRAPredictor.from_pretrained("tiny", tmp_path / "arch.ckpt")
    ckpt.pop("sam3lora")
    torch.save(ckpt, tmp_path / "foreign.ckpt")
    with pytest.raises(AdapterLoadError, match="not written by sam3lora"):
        Sam3LoRAPredictor.from_pretrained("tiny", tmp_path / "foreign.ckpt")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(AdapterLoadError, match="junk.ckpt: not a readable"):
        Sam3LoRAPredictor.from_pretrained("tiny", tmp_path / "junk.ckpt")


def test_a_checkpoint_goes_through_the_checks_of_a_resume(adapters, tmp_path):
    """The predictor reads a ``.ckpt`` through ``Sam3LoRAModule.load_from_checkpoint``, so through the
    ``on_load_checkpoint`` checks of a resume: weights it does not expect are refused (``strict_loading`` is off)."""
    ckpt = torch.load(adapters / "a.ckpt", weights_only=True)
    ckpt["state_dict"]["model.base_model.model.no_such_module.lora_A.default.weight"] = torch.zeros(4, 4)
    torch.save(ckpt, tmp_path / "extra.ckpt")
    with pytest.raises(AdapterMismatchError, match=r"extra.ckpt: holds 1 weight\(s\) this model does not train"):
        Sam3LoRAPredictor.from_pretrained("tiny", tmp_path / "extra.ckpt")
    del ckpt["state_dict"]["model.base_model.model.no_such_module.lora_A.default.weight"]
    ckpt["hyper_parameters"]["lora_settings"] = None  # a checkpoint of a module built without LoRA settings
    torch.save(ckpt, tmp_path / "unset.ckpt")
    with pytest.raises(AdapterLoadError, match="records no LoRA settings"):
        Sam3LoRAPredictor.from_pretrained("tiny", tmp_path / "unset.ckpt")


def test_adapter_for_another_base_is_refused(tmp_path):
    other = make_adapter(tmp_path / "other", seed=3, base_seed=1)  # trained on tiny with other base weights
    make_checkpoint(tmp_path / "other.ckpt", other)
    for source in ("other", "other.ckpt"):
        with pytest.raises(AdapterMismatchError, match="weights"):
            Sam3LoRAPredictor.from_pretrained("tiny", tmp_path / source)


def test_prompt_and_path_errors(base_predictor, tmp_path):
    im = images(1)[0]  # 130 x 90 (W x H)
    with pytest.raises(PromptError, match=r"box 100,10,140,50 is outside the image \(130x90"):
        base_predictor.predict(im, text=PROMPTS[0], boxes=[[100, 10, 140, 50]])
    with pytest.raises(PromptError, match="empty text prompt"):
        base_predictor.predict(im, text=["red circle", "  "])
    with pytest.raises(PromptError, match="no prompt"):
        base_predictor.predict(im)
    with pytest.raises(PromptError, match="reversed"):
        base_predictor.predict(im, boxes=[[50, 10, 20, 40]])
    with pytest.raises(PredictorError, match="missing.png: image file not found"):
        base_predictor.predict(str(tmp_path / "missing.png"), text=PROMPTS[0])
    with pytest.raises(AdapterLoadError, match="nowhere: no such adapter"):
        Sam3LoRAPredictor.from_pretrained("tiny", tmp_path / "nowhere")
