"""Benchmark inputs without a dataset: random ``Sam3Batch``es and the full-size SAM 3 with random weights."""

from __future__ import annotations

import torch
from transformers import Sam3Config, Sam3Model, Sam3Processor

from sam3lora.data.batch import Sam3Batch
from sam3lora.model.tiny import offline_processor
from sam3lora.sam3 import TEXT_LENGTH
from sam3lora.sam3 import distinct_prompts as prompt_rows

PATCH = 14


def sam3_config(image_size: int = 1008) -> Sam3Config:
    """``Sam3Config()`` (the released architecture) at ``image_size`` px (a multiple of 14).

    What depends on the input size: the ViT's ``image_size`` (grid of its global-attention RoPE) and the neck's
    ``backbone_feature_sizes`` (4x, 2x, 1x the patch grid). Windowed layers pad to the 24-patch window.
    """
    if image_size % PATCH or image_size < 4 * PATCH:
        raise ValueError(f"image size must be a multiple of {PATCH} and >= {4 * PATCH}, got {image_size}")
    config = Sam3Config()
    grid = image_size // PATCH
    config.vision_config.backbone_config.image_size = image_size
    config.vision_config.backbone_feature_sizes = [[4 * grid, 4 * grid], [2 * grid, 2 * grid], [grid, grid]]
    return config


def sam3_processor(image_size: int = 1008) -> Sam3Processor:
    """SAM 3's image processing at ``image_size`` (masks at 2/7 of it) with the offline tiny tokenizer.

    The real CLIP tokenizer is on the gated hub; any ids below the vocabulary size serve for timing.
    """
    return offline_processor(image_size, image_size * 2 // 7)


def random_sam3(
    image_size: int = 1008, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", seed: int = 0
) -> tuple[Sam3Model, Sam3Processor]:
    """The full-size SAM 3 (840M parameters) with random weights, built directly on ``device``."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = Sam3Model(sam3_config(image_size))
    return model.to(dtype).eval(), sam3_processor(image_size)


def synthetic_batch(
    images: int,
    prompts: int,
    image_size: int,
    vocab_size: int,
    *,
    distinct_prompts: int = 8,
    max_instances: int = 3,
    first_image_id: int = 0,
    seed: int = 0,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    device: str | torch.device = "cpu",
) -> Sam3Batch:
    """A random ``Sam3Batch`` of ``images`` x ``prompts`` rows (text prompts, one padding box each).

    Prompts are drawn from ``distinct_prompts`` random token sequences (as a dataset's categories repeat); about a
    third of the rows are negatives (no instance), the others hold 1..``max_instances`` boxes with box-shaped masks.
    Image ids are ``first_image_id ..``; the same ``seed`` gives the same batch. Token ids: BOS, 1-5 random
    words, EOS (default ``vocab_size - 2`` and ``- 1``, as CLIP's), then EOS padding.
    """
    g = torch.Generator().manual_seed(seed)
    rows = images * prompts
    size = image_size
    bos = vocab_size - 2 if bos_token_id is None else bos_token_id
    eos = vocab_size - 1 if eos_token_id is None else eos_token_id
    low = max(bos, eos) + 1 if max(bos, eos) < vocab_size // 2 else 0  # word ids avoid the special tokens
    high = min(bos, eos) if low == 0 else vocab_size
    table_ids = torch.full((distinct_prompts, TEXT_LENGTH), eos, dtype=torch.long)
    table_mask = torch.zeros(distinct_prompts, TEXT_LENGTH, dtype=torch.long)
    for p in range(distinct_prompts):
        n = int(torch.randint(1, 6, (), generator=g))
        words = torch.randint(low, high, (n,), generator=g)
        table_ids[p, : n + 2] = torch.cat([torch.tensor([bos]), words, torch.tensor([eos])])
        table_mask[p, : n + 2] = 1
    choice = torch.randint(0, distinct_prompts, (rows,), generator=g)
    targets = []
    for _ in range(rows):
        n = int(torch.randint(-(max_instances // 2 + 1), max_instances + 1, (), generator=g).clamp(min=0))
        xy = torch.rand(n, 2, generator=g) * 0.6
        wh = torch.rand(n, 2, generator=g) * 0.3 + 0.05
        boxes = torch.cat([xy, xy + wh], dim=1).clamp(max=1.0)
        masks = torch.zeros(n, size, size, dtype=torch.bool)
        for k, (x0, y0, x1, y1) in enumerate((boxes * size).long().tolist()):
            masks[k, y0:y1, x0:x1] = True
        targets.append({"boxes": boxes, "masks": masks, "has_mask": torch.ones(n, dtype=torch.bool)})
    input_ids, attention_mask = table_ids[choice], table_mask[choice]
    texts = [f"prompt {int(c)}" for c in choice]  # one text per random token sequence
    text_rows, text_index = prompt_rows(texts)
    batch = Sam3Batch(
        pixel_values=torch.randn(images, 3, size, size, generator=g),
        image_index=torch.arange(images).repeat_interleave(prompts),
        input_ids=input_ids,
        attention_mask=attention_mask,
        input_boxes=torch.zeros(rows, 1, 4),
        input_boxes_labels=torch.full((rows, 1), -10, dtype=torch.long),
        targets=targets,
        prompts=texts,
        category_ids=choice + 1,
        image_ids=torch.arange(first_image_id, first_image_id + images),
        orig_sizes=torch.full((images, 2), size, dtype=torch.long),
        text_rows=text_rows,
        text_index=text_index,
    )
    return to_device(batch, device)


def to_device(batch: Sam3Batch, device: str | torch.device) -> Sam3Batch:
    """Copy of ``batch`` with every tensor (targets included) on ``device``."""
    values = {}
    for name, value in vars(batch).items():
        if isinstance(value, torch.Tensor):
            value = value.to(device)
        elif name == "targets":
            value = [{k: t.to(device) for k, t in d.items()} for d in value]
        values[name] = value
    return Sam3Batch(**values)


def repeated_image_batch(batch: Sam3Batch) -> Sam3Batch:
    """The naive path as a batch: every row carries its own copy of its image (the encoder runs once per row)."""
    values = dict(vars(batch))
    values["pixel_values"] = batch.pixel_values[batch.image_index]
    values["image_ids"] = batch.image_ids[batch.image_index]
    values["orig_sizes"] = batch.orig_sizes[batch.image_index]
    values["image_index"] = torch.arange(batch.num_rows, device=batch.image_index.device)
    return Sam3Batch(**values)


def synthetic_outputs(
    batch: Sam3Batch, queries: int, mask_size: int, decoder_layers: int = 6, seed: int = 0
) -> dict[str, object]:
    """Random model outputs for ``batch`` in the criterion's format (leaf tensors that require grad).

    ``pred_logits (R,Q)``, ``pred_boxes (R,Q,4)`` valid xyxy, ``presence_logits (R,1)``, ``pred_masks`` and
    ``semantic_seg`` at ``mask_size`` (SAM 3: 2/7 of the input size), and ``decoder_layers - 1`` aux outputs.
    """
    g = torch.Generator().manual_seed(seed)
    rows = batch.num_rows
    device = batch.pixel_values.device

    def leaf(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device).requires_grad_(True)

    def boxes() -> torch.Tensor:
        xy = torch.rand(rows, queries, 2, generator=g) * 0.7
        wh = torch.rand(rows, queries, 2, generator=g) * 0.3 + 0.01
        return torch.cat([xy, xy + wh], dim=-1).to(device).requires_grad_(True)

    return {
        "pred_logits": leaf(rows, queries),
        "pred_boxes": boxes(),
        "presence_logits": leaf(rows, 1),
        "pred_masks": leaf(rows, queries, mask_size, mask_size),
        "semantic_seg": leaf(rows, 1, mask_size, mask_size),
        "aux_outputs": [
            {"pred_logits": leaf(rows, queries), "pred_boxes": boxes(), "presence_logits": leaf(rows, 1)}
            for _ in range(decoder_layers - 1)
        ],
    }
