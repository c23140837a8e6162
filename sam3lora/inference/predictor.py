"""``Sam3LoRAPredictor``: SAM 3 (+ LoRA adapters) on images with text and/or exemplar-box prompts.

Inputs, forward pass and post-processing are the functions of the SAM 3 contract ``sam3lora.sam3`` (torch +
transformers only; the model cards copy them as the plain-transformers snippet; training runs the same forward):
the processor resizes (stretch) and normalises each image; one row per (image, prompt); text-only rows carry one
padding box (label -10), as Meta's model; exemplar boxes are normalised cxcywh with label 1. The vision encoder runs
once per image and its features are indexed per row. Scores are SAM 3's: sigmoid(logit) * sigmoid(presence); masks
are upsampled logits, then sigmoid > mask_threshold (Meta's post-processor).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from torch import Tensor, nn
from transformers import Sam3Processor

from sam3lora.inference.errors import PredictorError, PromptError
from sam3lora.inference.images import ImageInput, image_name, to_pil
from sam3lora.inference.model_with_adapters import LoadedModel, load_for_inference
from sam3lora.sam3 import VISUAL_PROMPT, sam3_forward, sam3_inputs, sam3_instances, sam3_keep

__all__ = ["Prompt", "PromptResult", "Sam3LoRAPredictor", "make_prompts"]
_DEFAULT: Any = object()  # "the adapter this predictor uses by default"


@dataclass(frozen=True)
class Prompt:
    """One query: ``text`` plus optional exemplar ``boxes`` (xyxy pixels of the image, positive)."""

    text: str
    boxes: tuple[tuple[float, float, float, float], ...] = ()


@dataclass
class PromptResult:
    """Instances found for one prompt on one image, best first.

    Attributes:
        prompt: the prompt text (``"visual"`` for box-only prompts).
        masks: bool (N, H, W) at the original image resolution.
        boxes: float32 (N, 4) xyxy pixels of the original image, clamped to it.
        scores: float32 (N,) sigmoid(logit) * sigmoid(presence), all >= the threshold, descending.
    """

    prompt: str
    masks: Tensor
    boxes: Tensor
    scores: Tensor

    def __len__(self) -> int:
        return len(self.scores)


@dataclass
class RowOutput:
    """Raw model output of one (image, prompt) row, all Q queries (on the model's device, float32).

    ``scores (Q,)``, ``boxes (Q,4)`` normalised xyxy, ``mask_logits (Q,h,w)`` at the model's mask resolution.
    """

    prompt: str
    scores: Tensor
    boxes: Tensor
    mask_logits: Tensor


@dataclass
class ImageOutput:
    """Raw outputs of one image: its position in the input list, ``size`` (H, W) and one ``RowOutput`` per prompt."""

    index: int
    size: tuple[int, int]
    rows: list[RowOutput]


def parse_box(text: str) -> tuple[float, float, float, float]:
    """``"x1,y1,x2,y2"`` (pixels; commas or spaces) -> four floats; ``PromptError`` otherwise."""
    parts = [p for p in re.split(r"[,\s]+", text.strip()) if p]
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 4:
        raise PromptError(f"box {text!r}: expected four numbers x1,y1,x2,y2 (pixels)")
    return values  # type: ignore[return-value]


def prompt_slug(text: str) -> str:
    """A file-name-safe form of a prompt: ``"Red circle!"`` -> ``"red-circle"``."""
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "prompt"


def make_prompts(text: str | Sequence[str] | None = None, boxes: Sequence[Any] | None = None) -> list[Prompt]:
    """Prompts from ``text`` (one or several) and ``boxes`` (xyxy pixels, applied as exemplars to every text).

    Box-only (no text) gives one prompt with the text ``"visual"``. Raises ``PromptError`` on an empty text, a
    malformed box, or no prompt at all.
    """
    texts = [text] if isinstance(text, str) else list(text or [])
    for t in texts:
        if not isinstance(t, str) or not t.strip():
            raise PromptError(f"empty text prompt {t!r}: give a phrase such as 'red circle'")
    box_list = list(boxes or [])
    if box_list and all(isinstance(v, (int, float)) for v in box_list):
        box_list = [box_list]  # one box given as four numbers
    parsed = []
    for box in box_list:
        try:
            values = tuple(float(v) for v in box)
        except (TypeError, ValueError):
            raise PromptError(f"box {box!r} must be four numbers x1,y1,x2,y2") from None
        if len(values) != 4 or not all(math.isfinite(v) for v in values):
            raise PromptError(f"box {box!r} must be four finite numbers x1,y1,x2,y2")
        if values[2] <= values[0] or values[3] <= values[1]:
            raise PromptError(f"box {box!r} is empty or reversed: need x1 < x2 and y1 < y2 (xyxy pixels)")
        parsed.append(values)
    if not texts and not parsed:
        raise PromptError("no prompt: give a text prompt, an exemplar box, or both")
    return [Prompt(t.strip(), tuple(parsed)) for t in texts] if texts else [Prompt(VISUAL_PROMPT, tuple(parsed))]


def check_boxes_inside(prompt: Prompt, size: tuple[int, int], name: str) -> None:
    """Raise ``PromptError`` if an exemplar box of ``prompt`` leaves the image of ``size`` (H, W)."""
    height, width = size
    for box in prompt.boxes:
        x1, y1, x2, y2 = box
        if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
            shown = ",".join(f"{v:g}" for v in box)
            raise PromptError(f"{name}: box {shown} is outside the image ({width}x{height} px, WxH)")


def _device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise PredictorError(f"device {device!r}: {err}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PredictorError(f"device {device!r}: CUDA is not available on this machine (use device='cpu')")
    return dev


class Sam3LoRAPredictor:
    """Run SAM 3 with LoRA adapters on images.

    Build it with :meth:`from_pretrained`. ``predict`` returns instances at the original resolution; ``outputs``
    yields the raw per-query outputs (for evaluation).
    """

    def __init__(self, loaded: LoadedModel, device: str = "cpu") -> None:
        self.device = _device(device)
        self.model: nn.Module = loaded.model.to(self.device).eval()
        self.dtype = next(self.model.parameters()).dtype  # inputs are cast to the weights' dtype
        self.processor: Sam3Processor = loaded.processor
        self.adapters: list[str] = list(loaded.adapters)
        self.merged: str | None = loaded.merged
        size = self.processor.image_processor.size
        self.image_size = (int(size["height"]), int(size["width"]))

    @classmethod
    def from_pretrained(
        cls,
        base: str = "facebook/sam3",
        adapter: str | Path | Mapping[str, str | Path] | None = None,
        device: str = "cpu",
        dtype: str = "float32",
        merge: bool = True,
        *,
        seed: int = 0,
        image_size: int | None = None,
    ) -> Sam3LoRAPredictor:
        """Load ``base`` (``tiny`` | hub id | local dir) once and attach ``adapter``.

        Args:
            adapter: None; a PEFT adapter directory or a sam3lora Lightning ``.ckpt``; or ``{name: path}`` for
                several adapters on one base, chosen per call with ``predict(..., adapter=name)``.
            device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
            dtype: ``float32 | bfloat16 | float16`` (``fp32 | bf16 | fp16``).
            merge: merge a single adapter into the weights (faster; the base alone is then unavailable). Several
                adapters are never merged.
            seed / image_size: tiny preset seed; expected model input size (checked if given).
        """
        dev = _device(device)  # fail before loading anything
        loaded = load_for_inference(base, adapter, dtype=dtype, merge=merge, seed=seed, image_size=image_size)
        return cls(loaded, device=str(dev))

    # ----------------------------------------------------------------------------------------- adapters
    def _resolve_adapter(self, adapter: Any) -> str | None:
        if adapter is _DEFAULT:
            if len(self.adapters) > 1:
                raise PredictorError(
                    f"several adapters are loaded ({', '.join(self.adapters)}): pass adapter=<name>, or None for "
                    "the base model"
                )
            return self.adapters[0] if self.adapters else None
        if adapter is not None and adapter not in self.adapters:
            loaded = ", ".join(self.adapters) or "none"
            raise PredictorError(f"unknown adapter {adapter!r}; loaded adapters: {loaded}")
        if self.merged is not None and adapter != self.merged:
            raise PredictorError(
                f"adapter {self.merged!r} is merged into the weights, so the base alone is not available: load "
                "with merge=False to compare with the base"
            )
        return adapter

    @contextmanager
    def using(self, adapter: Any = _DEFAULT) -> Iterator[None]:
        """Context in which the model runs ``adapter`` (a loaded name, or None for the base alone)."""
        name = self._resolve_adapter(adapter)
        if self.merged is not None or not isinstance(self.model, PeftModel):
            yield
        elif name is None:
            with self.model.disable_adapter():
                yield
        else:
            self.model.set_adapter(name)
            yield

    # ----------------------------------------------------------------------------------------- forward
    @torch.no_grad()
    def forward_rows(
        self,
        pixel_values: Tensor,
        image_index: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor,
        input_boxes: Tensor,
        input_boxes_labels: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One vision pass over I images, then the rest of SAM 3 over R rows.

        Args: pixel_values (I,3,S,S); image_index long (R,); input_ids, attention_mask (R,32); input_boxes (R,K,4)
        normalised cxcywh; input_boxes_labels (R,K).
        Returns: scores (R,Q), boxes (R,Q,4) normalised xyxy, mask logits (R,Q,h,w), all float32.
        """
        inputs = {
            "pixel_values": pixel_values, "image_index": image_index, "input_ids": input_ids,
            "attention_mask": attention_mask, "input_boxes": input_boxes, "input_boxes_labels": input_boxes_labels,
        }
        return sam3_forward(self.model, inputs)

    def outputs(
        self,
        images: Sequence[ImageInput],
        prompts: Sequence[Prompt],
        batch_size: int = 4,
        adapter: Any = _DEFAULT,
    ) -> Iterator[ImageOutput]:
        """Raw outputs per image, in order: images run ``batch_size`` at a time, every prompt of one image sharing
        one vision pass. Raises ``PromptError`` for an exemplar box outside an image.

        The adapter is switched for the life of the generator: consume one ``outputs`` generator at a time.
        """
        if batch_size < 1:
            raise PredictorError(f"batch_size must be >= 1, got {batch_size}")
        if not prompts:
            raise PromptError("no prompt: give a text prompt, an exemplar box, or both")
        num_prompts = len(prompts)
        pairs = [(p.text, [list(b) for b in p.boxes]) for p in prompts]
        with self.using(adapter):
            for start in range(0, len(images), batch_size):
                chunk = [to_pil(im, start + i) for i, im in enumerate(images[start : start + batch_size])]
                sizes = [(im.height, im.width) for im in chunk]
                for i, size in enumerate(sizes):
                    for prompt in prompts:
                        check_boxes_inside(prompt, size, image_name(images[start + i], start + i))
                scores, pred_boxes, masks = sam3_forward(self.model, sam3_inputs(self.processor, chunk, pairs))
                for i, size in enumerate(sizes):
                    rows = [
                        RowOutput(p.text, scores[r], pred_boxes[r], masks[r])
                        for p, r in zip(prompts, range(i * num_prompts, (i + 1) * num_prompts), strict=True)
                    ]
                    yield ImageOutput(start + i, size, rows)

    # ----------------------------------------------------------------------------------------- results
    @staticmethod
    def instances(
        row: RowOutput, size: tuple[int, int], keep: Tensor, mask_threshold: float = 0.5
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Masks, boxes and scores of the queries ``keep`` (long (N,)) of ``row`` at the original ``size`` (H, W).

        Returns masks bool (N,H,W) (mask logits upsampled bilinearly, then sigmoid > mask_threshold), boxes float32
        (N,4) xyxy pixels clamped to the image, scores float32 (N,). All on the CPU.
        """
        return sam3_instances(row.scores, row.boxes, row.mask_logits, size, keep, mask_threshold)

    def predict(
        self,
        images: ImageInput | Sequence[ImageInput],
        text: str | Sequence[str] | None = None,
        boxes: Sequence[Any] | None = None,
        threshold: float = 0.5,
        mask_threshold: float = 0.5,
        batch_size: int = 4,
        adapter: Any = _DEFAULT,
    ) -> list[list[PromptResult]]:
        """Segment every prompt on every image.

        Args:
            images: a PIL image, a path, a uint8 array, or a list of them.
            text: a prompt or a list of prompts, each applied to every image.
            boxes: exemplar boxes (xyxy pixels, positive), applied to every text prompt (box only: text "visual").
            threshold: keep instances scoring >= this; mask_threshold: mask probability for a foreground pixel.
            batch_size: images per forward pass.
            adapter: a loaded adapter's name, or None for the base alone (default: the only adapter, or the base
                when none is loaded).
        Returns:
            per image, one ``PromptResult`` per prompt (in prompt order).
        """
        if not 0.0 <= threshold <= 1.0 or not 0.0 <= mask_threshold <= 1.0:
            raise PredictorError(f"threshold and mask_threshold must be in [0, 1], got {threshold}, {mask_threshold}")
        image_list = list(images) if isinstance(images, (list, tuple)) else [images]
        prompts = make_prompts(text, boxes)
        results: list[list[PromptResult]] = []
        for out in self.outputs(image_list, prompts, batch_size=batch_size, adapter=adapter):
            per_prompt = []
            for row in out.rows:
                keep = sam3_keep(row.scores, threshold)
                masks, xyxy, scores = self.instances(row, out.size, keep, mask_threshold)
                per_prompt.append(PromptResult(row.prompt, masks, xyxy, scores))
            results.append(per_prompt)
        return results

