"""The SAM 3 contract: how sam3lora feeds ``Sam3Model`` and reads its outputs, in training and in prediction.

This is the one place that states it: the prompt constants, tokenising, the rows of a batch, the forward pass
(vision once per image, indexed per row) and the scores and instances read from its outputs. Data, training,
evaluation, prediction, export and the demo import it. It imports only torch, PIL and transformers (no sam3lora),
so that the model card of every adapter and merged export copies its source as the "plain transformers + PEFT"
snippet: the snippet, ``sam3lora-predict`` and the training forward are one implementation.

Inputs (``sam3_inputs``): one row per (image, prompt). The image is resized (stretched) and normalised by
``Sam3Processor``; the text is tokenized to 32 tokens (``tokenize``; a box-only prompt has the text
``VISUAL_PROMPT``); exemplar boxes (xyxy pixels) become normalised cxcywh with label 1. A text-only row carries ONE
PADDING BOX (zeros, label ``PAD_LABEL`` = -10): the geometry encoder masks it out but still appends its CLS token to
the prompt, as Meta's official model always does. ``Sam3Processor(text=...)`` sends no box for text-only prompts,
so the geometry encoder is skipped and the detections differ. Training builds the same rows from its datasets
(``sam3lora.data.rows``, negatives with label 0 included).

Forward (``sam3_rows``, with grad, as training runs it; ``sam3_forward``, no grad, as prediction runs it): the
vision encoder runs once per image; its features are indexed per row. Score of a query (``sam3_scores``) =
sigmoid(logit) * sigmoid(presence logit).

Post-processing (``sam3_keep``, ``sam3_instances``), as Meta's ``PostProcessImage``: mask LOGITS are upsampled
bilinearly (align_corners=False) to the original size, then sigmoid > mask_threshold; boxes (normalised xyxy) are
scaled to pixels. Differences from Meta's: instances scoring >= threshold are kept (Meta: >), sorted by score, and
boxes are clamped to the image. transformers' ``post_process_instance_segmentation`` instead upsamples mask
PROBABILITIES (masks differ at edges), keeps scores > threshold in query order, does not clamp boxes and returns
long masks.
"""

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import PreTrainedTokenizerBase, Sam3Processor
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.sam3.modeling_sam3 import Sam3ImageSegmentationOutput, Sam3VisionEncoderOutput

PAD_LABEL = -10  # label of a padding box: masked out, but the geometry encoder still adds its CLS token
TEXT_LENGTH = 32  # tokens per prompt (SAM 3's text context)
VISUAL_PROMPT = "visual"  # the text SAM 3 pairs with box-only prompts (as Sam3Processor does)
MASK_CHUNK = 16  # masks upsampled per step (bounds memory at large image sizes)


def tokenize(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The processor's tokenizer on ``texts`` -> ``input_ids``, ``attention_mask`` long (N, TEXT_LENGTH)."""
    enc = tokenizer(list(texts), padding="max_length", max_length=TEXT_LENGTH, truncation=True, return_tensors="pt")
    return enc["input_ids"].long(), enc["attention_mask"].long()


def distinct_prompts(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct prompts of R rows, from their texts (host strings: no device read).

    Returns ``text_rows`` long (U,), the first row of each distinct text in order of appearance, and ``text_index``
    long (R,), row -> its entry of ``text_rows`` (``sam3_rows`` encodes the U rows once).
    """
    entry: dict[str, int] = {}  # text -> its entry of text_rows
    rows: list[int] = []
    index: list[int] = []
    for r, text in enumerate(texts):
        if text not in entry:
            entry[text] = len(rows)
            rows.append(r)
        index.append(entry[text])
    return torch.tensor(rows, dtype=torch.long), torch.tensor(index, dtype=torch.long)


def exemplar_boxes(xyxy: torch.Tensor) -> torch.Tensor:
    """Exemplar boxes as the model reads them: normalised xyxy (K,4) -> normalised cxcywh (K,4)."""
    return torch.cat([(xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]], dim=1)


def sam3_inputs(
    processor: Sam3Processor, images: list[Image.Image], prompts: list[tuple[str, list[list[float]]]]
) -> dict[str, torch.Tensor]:
    """Sam3Model inputs for every (image, prompt) pair, rows ordered image by image.

    Args:
        processor: the ``Sam3Processor`` of the model.
        images: RGB PIL images (any sizes).
        prompts: ``(text, boxes)`` pairs; ``boxes`` are exemplar boxes in xyxy pixels of each image (positive),
            ``[]`` for a text-only prompt. Box-only prompts use the text ``VISUAL_PROMPT``.
    Returns:
        ``pixel_values`` (I,3,S,S), ``image_index`` long (I*P,) (row -> image), ``input_ids`` and
        ``attention_mask`` long (I*P,32), ``input_boxes`` (I*P,K,4) normalised cxcywh, ``input_boxes_labels``
        long (I*P,K): 1 for an exemplar, -10 for padding (K >= 1: text-only rows get one padding box),
        ``text_rows`` long (U,) and ``text_index`` long (I*P,): the distinct prompts (``distinct_prompts``).
    """
    input_ids, attention_mask = tokenize(processor.tokenizer, [text for text, _ in prompts])
    slots = max([1] + [len(boxes) for _, boxes in prompts])
    input_boxes = torch.zeros(len(images), len(prompts), slots, 4)
    labels = torch.full((len(images), len(prompts), slots), PAD_LABEL, dtype=torch.long)
    for i, image in enumerate(images):
        size = torch.tensor([image.width, image.height, image.width, image.height], dtype=torch.float32)
        for p, (_, boxes) in enumerate(prompts):
            if len(boxes):
                cxcywh = exemplar_boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4) / size)
                input_boxes[i, p, : len(cxcywh)] = cxcywh
                labels[i, p, : len(cxcywh)] = 1
    input_ids, attention_mask = input_ids.repeat(len(images), 1), attention_mask.repeat(len(images), 1)
    text_rows, text_index = distinct_prompts([text for text, _ in prompts] * len(images))  # rows image-major
    return {
        "pixel_values": processor(images=list(images), return_tensors="pt")["pixel_values"],
        "image_index": torch.arange(len(images)).repeat_interleave(len(prompts)),
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "input_boxes": input_boxes.flatten(0, 1),
        "input_boxes_labels": labels.flatten(0, 1),
        "text_rows": text_rows,
        "text_index": text_index,
    }


def sam3_rows(
    model: torch.nn.Module,
    inputs: dict[str, torch.Tensor],
    vision: Sam3VisionEncoderOutput | None = None,
    text_embeds: BaseModelOutputWithPooling | None = None,
) -> Sam3ImageSegmentationOutput:
    """``model``'s raw outputs for the R rows of ``inputs`` (``sam3_inputs`` or a training batch), with grad.

    The vision encoder runs once on ``pixel_values`` (I,3,S,S), unless ``vision`` (its output for those I images,
    e.g. from a feature cache) is given; its ``fpn_*`` features are indexed per row by ``image_index`` (R,).
    ``text_embeds`` (the text encoder's output for the R rows) replaces ``input_ids`` when given. Otherwise, with
    ``text_rows`` (U,) and ``text_index`` (R,) in ``inputs`` (``distinct_prompts``), the text encoder runs once per
    distinct prompt and its output is indexed per row (gradients flow back through the index); without them it
    runs per row. No casting: inputs must be on the model's device.
    """
    if text_embeds is None and "text_index" in inputs:
        first, index = inputs["text_rows"], inputs["text_index"]
        distinct = model.get_text_features(
            input_ids=inputs["input_ids"][first], attention_mask=inputs["attention_mask"][first], return_dict=True
        )
        text_embeds = BaseModelOutputWithPooling(
            last_hidden_state=distinct.last_hidden_state[index], pooler_output=distinct.pooler_output[index]
        )
    if vision is None:
        vision = model.get_vision_features(pixel_values=inputs["pixel_values"])
    rows = inputs["image_index"]
    per_row = type(vision)(
        fpn_hidden_states=tuple(t[rows] for t in vision.fpn_hidden_states),
        fpn_position_encoding=tuple(t[rows] for t in vision.fpn_position_encoding),
    )
    text = {"input_ids": inputs["input_ids"]} if text_embeds is None else {"text_embeds": text_embeds}
    return model(
        vision_embeds=per_row,
        **text,
        attention_mask=inputs["attention_mask"],
        input_boxes=inputs["input_boxes"],
        input_boxes_labels=inputs["input_boxes_labels"],
    )


def sam3_scores(pred_logits: torch.Tensor, presence_logits: torch.Tensor) -> torch.Tensor:
    """Score of each query: sigmoid(logit) (R,Q) * sigmoid(presence logit) (R,1) -> (R,Q)."""
    return pred_logits.sigmoid() * presence_logits.sigmoid()


@torch.no_grad()
def sam3_forward(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Run ``model`` (a ``Sam3Model``, or a ``PeftModel`` around one) on ``sam3_inputs``: one vision pass per image.

    Returns ``scores`` (R,Q) = sigmoid(logit) * sigmoid(presence), ``boxes`` (R,Q,4) normalised xyxy and mask
    ``logits`` (R,Q,h,w), all float32 on the model's device. Inputs are cast to the weights' device (and the
    floating ones to their dtype).
    """
    weight = next(model.parameters())
    device, dtype = weight.device, weight.dtype
    cast = {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in inputs.items()}
    out = sam3_rows(model, cast)
    scores = sam3_scores(out.pred_logits.float(), out.presence_logits.float())
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
