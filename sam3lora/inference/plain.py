"""SAM 3 from plain transformers, exactly as sam3lora runs it: the inputs, the forward pass, the post-processing.

This module imports only torch, PIL and transformers (no sam3lora), so that the model card of every adapter and
merged export can copy its source as the "plain transformers + PEFT" snippet; ``Sam3LoRAPredictor`` calls the same
functions, so the snippet and ``sam3lora-predict`` are one implementation.

Inputs (``sam3_inputs``): one row per (image, prompt). The image is resized (stretched) and normalised by
``Sam3Processor``; the text is tokenized to 32 tokens; exemplar boxes (xyxy pixels) become normalised cxcywh with
label 1. A text-only row carries ONE PADDING BOX (zeros, label -10): the geometry encoder masks it out but still
appends its CLS token to the prompt, as Meta's official model always does. ``Sam3Processor(text=...)`` sends no
box for text-only prompts, so the geometry encoder is skipped and the detections differ.

Forward (``sam3_forward``): the vision encoder runs once per image; its features are indexed per row. Score of a
query = sigmoid(logit) * sigmoid(presence logit).

Post-processing (``sam3_instances``), as Meta's ``PostProcessImage``: mask LOGITS are upsampled bilinearly
(align_corners=False) to the original size, then sigmoid > mask_threshold; boxes (normalised xyxy) are scaled to
pixels. Differences from Meta's: instances scoring >= threshold are kept (Meta: >), sorted by score, and boxes are
clamped to the image. transformers' ``post_process_instance_segmentation`` instead upsamples mask PROBABILITIES
(masks differ at edges), keeps scores > threshold in query order, does not clamp boxes and returns long masks.
"""

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import Sam3Processor

PAD_LABEL = -10  # label of a padding box: masked out, but the geometry encoder still adds its CLS token
TEXT_LENGTH = 32  # tokens per prompt (SAM 3's text context)
MASK_CHUNK = 16  # masks upsampled per step (bounds memory at large image sizes)


def sam3_inputs(
    processor: Sam3Processor, images: list[Image.Image], prompts: list[tuple[str, list[list[float]]]]
) -> dict[str, torch.Tensor]:
    """Sam3Model inputs for every (image, prompt) pair, rows ordered image by image.

    Args:
        processor: the ``Sam3Processor`` of the model.
        images: RGB PIL images (any sizes).
        prompts: ``(text, boxes)`` pairs; ``boxes`` are exemplar boxes in xyxy pixels of each image (positive),
            ``[]`` for a text-only prompt. Box-only prompts use the text ``"visual"``.
    Returns:
        ``pixel_values`` (I,3,S,S), ``image_index`` long (I*P,) (row -> image), ``input_ids`` and
        ``attention_mask`` long (I*P,32), ``input_boxes`` (I*P,K,4) normalised cxcywh, ``input_boxes_labels``
        long (I*P,K): 1 for an exemplar, -10 for padding (K >= 1: text-only rows get one padding box).
    """
    tokens = processor.tokenizer(
        [text for text, _ in prompts], padding="max_length", max_length=TEXT_LENGTH, truncation=True,
        return_tensors="pt",
    )
    slots = max([1] + [len(boxes) for _, boxes in prompts])
    input_boxes = torch.zeros(len(images), len(prompts), slots, 4)
    labels = torch.full((len(images), len(prompts), slots), PAD_LABEL, dtype=torch.long)
    for i, image in enumerate(images):
        size = torch.tensor([image.width, image.height, image.width, image.height], dtype=torch.float32)
        for p, (_, boxes) in enumerate(prompts):
            if len(boxes):
                xyxy = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4) / size
                cxcywh = torch.cat([(xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]], dim=1)
                input_boxes[i, p, : len(cxcywh)] = cxcywh
                labels[i, p, : len(cxcywh)] = 1
    return {
        "pixel_values": processor(images=list(images), return_tensors="pt")["pixel_values"],
        "image_index": torch.arange(len(images)).repeat_interleave(len(prompts)),
        "input_ids": tokens["input_ids"].repeat(len(images), 1),
        "attention_mask": tokens["attention_mask"].repeat(len(images), 1),
        "input_boxes": input_boxes.flatten(0, 1),
        "input_boxes_labels": labels.flatten(0, 1),
    }


@torch.no_grad()
def sam3_forward(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Run ``model`` (a ``Sam3Model``, or a ``PeftModel`` around one) on ``sam3_inputs``: one vision pass per image.

    Returns ``scores`` (R,Q) = sigmoid(logit) * sigmoid(presence), ``boxes`` (R,Q,4) normalised xyxy and mask
    ``logits`` (R,Q,h,w), all float32 on the model's device. Inputs are cast to the weights' device and dtype.
    """
    weight = next(model.parameters())
    device, dtype = weight.device, weight.dtype
    vision = model.get_vision_features(pixel_values=inputs["pixel_values"].to(device, dtype))
    rows = inputs["image_index"].to(device)
    per_row = type(vision)(
        fpn_hidden_states=tuple(t[rows] for t in vision.fpn_hidden_states),
        fpn_position_encoding=tuple(t[rows] for t in vision.fpn_position_encoding),
    )
    out = model(
        vision_embeds=per_row,
        input_ids=inputs["input_ids"].to(device),
        attention_mask=inputs["attention_mask"].to(device),
        input_boxes=inputs["input_boxes"].to(device, dtype),
        input_boxes_labels=inputs["input_boxes_labels"].to(device),
    )
    scores = out.pred_logits.float().sigmoid() * out.presence_logits.float().sigmoid()
    return scores, out.pred_boxes.float(), out.pred_masks.float()


def sam3_keep(scores: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Indices of the queries of one row scoring >= ``threshold``, best first (ties in query order)."""
    keep = torch.nonzero(scores >= threshold).flatten()
    return keep[scores[keep].argsort(descending=True, stable=True)]


def sam3_instances(
    scores: torch.Tensor,
    boxes: torch.Tensor,
    logits: torch.Tensor,
    size: tuple[int, int],
    keep: torch.Tensor,
    mask_threshold: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Instances ``keep`` of one row (``scores`` (Q,), ``boxes`` (Q,4), mask ``logits`` (Q,h,w)) at ``size`` (H, W).

    Returns masks bool (N,H,W) (logits upsampled bilinearly, then sigmoid > ``mask_threshold``), boxes float32
    (N,4) xyxy pixels clamped to the image and scores float32 (N,), all on the CPU.
    """
    height, width = size
    keep = keep.to(scores.device)
    masks = torch.zeros(len(keep), height, width, dtype=torch.bool)
    for start in range(0, len(keep), MASK_CHUNK):
        chunk = logits[keep[start : start + MASK_CHUNK]][None]
        upsampled = F.interpolate(chunk, size=(height, width), mode="bilinear", align_corners=False)[0]
        masks[start : start + MASK_CHUNK] = (upsampled.sigmoid_() > mask_threshold).cpu()
    scale = torch.tensor([width, height, width, height], dtype=torch.float32, device=boxes.device)
    pixels = (boxes[keep] * scale).cpu()
    pixels[:, 0::2] = pixels[:, 0::2].clamp(0, width)
    pixels[:, 1::2] = pixels[:, 1::2].clamp(0, height)
    return masks, pixels, scores[keep].cpu()


def sam3_predict(
    model: torch.nn.Module,
    processor: Sam3Processor,
    images: list[Image.Image],
    prompts: list[tuple[str, list[list[float]]]],
    threshold: float = 0.5,
    mask_threshold: float = 0.5,
    batch_size: int = 4,
) -> list[list[dict[str, torch.Tensor]]]:
    """Per image, per prompt: ``{"masks": bool (N,H,W), "boxes": (N,4) xyxy px, "scores": (N,)}``, best first.

    ``batch_size`` images share one forward pass (as ``sam3lora-predict --batch-size``, default 4).
    """
    results = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        scores, boxes, logits = sam3_forward(model, sam3_inputs(processor, chunk, prompts))
        for i, image in enumerate(chunk):
            per_prompt = []
            for p in range(len(prompts)):
                r = i * len(prompts) + p
                keep = sam3_keep(scores[r], threshold)
                masks, xyxy, kept = sam3_instances(
                    scores[r], boxes[r], logits[r], (image.height, image.width), keep, mask_threshold
                )
                per_prompt.append({"masks": masks, "boxes": xyxy, "scores": kept})
            results.append(per_prompt)
    return results
