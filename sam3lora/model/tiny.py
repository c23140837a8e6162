"""The ``tiny`` preset: a small SAM 3 built from the same transformers classes, fully offline.

It keeps every module name of ``facebook/sam3`` (all six components, a real geometry encoder) so LoRA targets,
checkpoints and code paths are the same; only widths, depths and the vocabulary shrink. It is materialised once
as a real transformers directory (``config.json``, ``model.safetensors``, tokenizer, processor) so that it loads
through exactly the ``from_pretrained`` path the real weights use, and so that adapters trained on it record a
base that plain transformers can open.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from transformers import CLIPTokenizer, Sam3Config, Sam3ImageProcessor, Sam3Model, Sam3Processor
from transformers.convert_slow_tokenizer import bytes_to_unicode

from sam3lora.io import atomic_dir

TINY_IMAGE_SIZE = 224
#: The shipped ``tiny-pretrained`` base (made by ``scripts/pretrain_tiny.py``): the tiny architecture trained in
#: full on a synthetic domain other than the demo's, so that the demo's LoRA adapts a base that knows something.
PRETRAINED_DIR = Path(__file__).resolve().parents[1] / "assets" / "tiny-pretrained"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"

# Whole-word tokens give the tiny text encoder an easier start; every other word falls back to bytes.
_WORDS = (
    "a an the of and or with on in visual object thing "
    "red green blue yellow magenta cyan orange purple white black gray grey pink brown dark light "
    "circle square triangle star ring cross ellipse hexagon rectangle diamond disk blob shape "
    "person people car truck bus bicycle dog cat bird horse cow sheep tree plant leaf fruit apple flower "
    "building house road roof window door boat ship plane field crop weed cell nucleus tumor lesion "
    "defect scratch crack hole box bottle cup chair table bag shelf product"
)


def _tiny_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE vocabulary and merges: specials, 256 bytes (alone and word-final), then ``_WORDS``."""
    symbols = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {BOS: 0, EOS: 1}
    for token in symbols + [s + "</w>" for s in symbols]:
        vocab.setdefault(token, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in _WORDS.split():
        chars = list(word)
        prefix = chars[0]
        for i, ch in enumerate(chars[1:], start=1):
            piece = ch + "</w>" if i == len(chars) - 1 else ch
            merged = prefix + piece
            if merged not in vocab:
                merges.append((prefix, piece))
                vocab[merged] = len(vocab)
            prefix = merged
    return vocab, merges


def tiny_tokenizer() -> CLIPTokenizer:
    """A CLIP tokenizer with the tiny vocabulary (no download)."""
    vocab, merges = _tiny_vocab()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=32)


def tiny_config(vocab_size: int) -> Sam3Config:
    """Sam3Config of the tiny preset: ViT 96 wide x 4 layers at 224 px, CLIP text 64 x 2, DETR 64 wide, 20 queries."""
    width = 64
    return Sam3Config(
        vision_config=dict(
            backbone_config=dict(
                model_type="sam3_vit_model",
                hidden_size=96,
                intermediate_size=384,
                num_hidden_layers=4,
                num_attention_heads=4,
                image_size=TINY_IMAGE_SIZE,
                patch_size=14,
                window_size=8,
                global_attn_indexes=[1, 3],
                pretrain_image_size=TINY_IMAGE_SIZE,
            ),
            fpn_hidden_size=width,
            backbone_feature_sizes=[[64, 64], [32, 32], [16, 16]],
        ),
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=32,
            projection_dim=64,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        ),
        geometry_encoder_config=dict(hidden_size=width, num_layers=1, num_attention_heads=4, intermediate_size=128),
        detr_encoder_config=dict(hidden_size=width, num_layers=2, num_attention_heads=4, intermediate_size=128),
        detr_decoder_config=dict(
            hidden_size=width, num_layers=3, num_attention_heads=4, intermediate_size=128, num_queries=20
        ),
        mask_decoder_config=dict(hidden_size=width, num_attention_heads=4),
    )


def tiny_processor() -> Sam3Processor:
    """Sam3Processor for the tiny preset: SAM 3's image processing at 224 px and the tiny tokenizer."""
    image_processor = Sam3ImageProcessor(
        size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE},
        mask_size={"height": TINY_IMAGE_SIZE * 2 // 7, "width": TINY_IMAGE_SIZE * 2 // 7},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    return Sam3Processor(image_processor=image_processor, tokenizer=tiny_tokenizer())


def build_tiny(seed: int = 0) -> tuple[Sam3Model, Sam3Processor]:
    """Build the tiny model with weights drawn from ``seed`` (deterministic), plus its processor."""
    processor = tiny_processor()
    config = tiny_config(vocab_size=len(processor.tokenizer))
    rng_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = Sam3Model(config)
    finally:
        torch.random.set_rng_state(rng_state)
    return model.eval(), processor


def sam3lora_home() -> Path:
    """Where materialised presets live: ``$SAM3LORA_HOME`` or ``~/.cache/sam3lora``."""
    return Path(os.environ.get("SAM3LORA_HOME", Path.home() / ".cache" / "sam3lora")).expanduser()


def materialise_tiny(seed: int = 0, root: Path | None = None) -> Path:
    """Write the tiny preset as a transformers directory once and return its path.

    The directory is written whole (temporary directory, then rename), so concurrent processes (DDP ranks,
    parallel tests) never see a half-written model.
    """
    target = (root or sam3lora_home()) / f"tiny-seed{seed}"
    if (target / "config.json").is_file():
        return target
    model, processor = build_tiny(seed)
    try:
        with atomic_dir(target) as tmp:
            model.save_pretrained(tmp)
            processor.save_pretrained(tmp)
            (tmp / "sam3lora_preset.json").write_text(json.dumps({"preset": "tiny", "seed": seed}, indent=2))
    except OSError:  # another process (a DDP rank, a parallel test) won the race; its copy is identical
        if not (target / "config.json").is_file():
            raise
    return target
