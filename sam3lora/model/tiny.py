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
from dataclasses import dataclass
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


@dataclass(frozen=True)
class TinyArch:
    """Sizes of a tiny variant (every other setting is the transformers default).

    ``patch``: ViT patch size (tokens per side = ``TINY_IMAGE_SIZE / patch``); the FPN levels SAM 3 uses are 4x, 2x
    and 1x that grid, and the masks are predicted at the 4x level (``mask_side``). ``width``: FPN, geometry, DETR
    and mask-decoder width (one number: the model adds these features together).
    """

    vit_width: int = 96
    vit_layers: int = 4
    vit_mlp: int = 384
    patch: int = 14
    window: int = 8
    global_attn: tuple[int, ...] = (1, 3)
    width: int = 64
    mlp: int = 128
    detr_encoder_layers: int = 2
    detr_decoder_layers: int = 3
    queries: int = 20
    text_width: int = 64
    text_layers: int = 2

    @property
    def grid(self) -> int:
        """ViT tokens per side."""
        return TINY_IMAGE_SIZE // self.patch

    @property
    def mask_side(self) -> int:
        """Side of the predicted masks (R,Q,mask_side,mask_side)."""
        return 4 * self.grid


#: The tiny variants. ``tiny``: ViT 96 x 4 at patch 14 (16 x 16 tokens), 64 wide heads, masks 64 x 64; the shipped
#: ``tiny-pretrained`` of 2026-11 has it (7 GFLOP per training image pass). ``tiny-fast``: the CPU-pretraining
#: variant of issue #12 (ViT 64 x 3 at patch 28: 8 x 8 tokens; 32 wide heads, masks 32 x 32; about 12x fewer
#: FLOPs per pass, docs/training.md).
TINY_VARIANTS: dict[str, TinyArch] = {
    "tiny": TinyArch(),
    "tiny-fast": TinyArch(vit_width=64, vit_layers=3, vit_mlp=256, patch=28, window=8, global_attn=(2,), width=32,
                          mlp=128, detr_encoder_layers=2, detr_decoder_layers=3, queries=20),
}


def tiny_arch(variant: str) -> TinyArch:
    """The sizes of ``variant`` (a key of ``TINY_VARIANTS``); anything else is a one-line error."""
    if variant not in TINY_VARIANTS:
        raise ValueError(f"unknown tiny variant {variant!r}: expected one of {sorted(TINY_VARIANTS)}")
    return TINY_VARIANTS[variant]


def tiny_config(vocab_size: int, variant: str = "tiny") -> Sam3Config:
    """Sam3Config of a tiny variant (``TINY_VARIANTS``) at ``TINY_IMAGE_SIZE`` px."""
    a = tiny_arch(variant)
    g = a.grid
    return Sam3Config(
        vision_config=dict(
            backbone_config=dict(
                model_type="sam3_vit_model",
                hidden_size=a.vit_width,
                intermediate_size=a.vit_mlp,
                num_hidden_layers=a.vit_layers,
                num_attention_heads=4,
                image_size=TINY_IMAGE_SIZE,
                patch_size=a.patch,
                window_size=a.window,
                global_attn_indexes=list(a.global_attn),
                pretrain_image_size=TINY_IMAGE_SIZE,
            ),
            fpn_hidden_size=a.width,
            backbone_feature_sizes=[[4 * g, 4 * g], [2 * g, 2 * g], [g, g]],
        ),
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=a.text_width,
            intermediate_size=4 * a.text_width,
            num_hidden_layers=a.text_layers,
            num_attention_heads=4,
            max_position_embeddings=32,
            projection_dim=a.text_width,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        ),
        geometry_encoder_config=dict(hidden_size=a.width, num_layers=1, num_attention_heads=4,
                                     intermediate_size=a.mlp),
        detr_encoder_config=dict(hidden_size=a.width, num_layers=a.detr_encoder_layers, num_attention_heads=4,
                                 intermediate_size=a.mlp),
        detr_decoder_config=dict(
            hidden_size=a.width, num_layers=a.detr_decoder_layers, num_attention_heads=4, intermediate_size=a.mlp,
            num_queries=a.queries,
        ),
        mask_decoder_config=dict(hidden_size=a.width, num_attention_heads=4),
    )


def offline_processor(image_size: int, mask_side: int) -> Sam3Processor:
    """SAM 3's image processing (``image_size`` px in, masks at ``mask_side`` px, mean/std 0.5) with the offline
    tiny tokenizer: what every model built here without the hub (tiny variants, random full-size) uses."""
    image_processor = Sam3ImageProcessor(
        size={"height": image_size, "width": image_size},
        mask_size={"height": mask_side, "width": mask_side},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    return Sam3Processor(image_processor=image_processor, tokenizer=tiny_tokenizer())


def tiny_processor(variant: str = "tiny") -> Sam3Processor:
    """Sam3Processor for a tiny variant: SAM 3's image processing at 224 px and the tiny tokenizer."""
    return offline_processor(TINY_IMAGE_SIZE, tiny_arch(variant).mask_side)


def build_tiny(seed: int = 0, variant: str = "tiny") -> tuple[Sam3Model, Sam3Processor]:
    """Build a tiny variant with weights drawn from ``seed`` (deterministic), plus its processor."""
    processor = tiny_processor(variant)
    config = tiny_config(vocab_size=len(processor.tokenizer), variant=variant)
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


def materialise_tiny(seed: int = 0, root: Path | None = None, variant: str = "tiny") -> Path:
    """Write a tiny variant as a transformers directory (``<variant>-seed<seed>``) once and return its path.

    The directory is written whole (temporary directory, then rename), so concurrent processes (DDP ranks,
    parallel tests) never see a half-written model.
    """
    target = (root or sam3lora_home()) / f"{variant}-seed{seed}"
    if (target / "config.json").is_file():
        return target
    model, processor = build_tiny(seed, variant)
    try:
        with atomic_dir(target) as tmp:
            model.save_pretrained(tmp)
            processor.save_pretrained(tmp)
            (tmp / "sam3lora_preset.json").write_text(json.dumps({"preset": variant, "seed": seed}, indent=2))
    except OSError:  # another process (a DDP rank, a parallel test) won the race; its copy is identical
        if not (target / "config.json").is_file():
            raise
    return target
