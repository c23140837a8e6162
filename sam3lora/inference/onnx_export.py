"""ONNX export of a merged SAM 3 for one (image, prompt) row: text plus one exemplar-box slot, fixed shapes.

The graph is traced with PyTorch's TorchScript ONNX exporter (``torch.onnx.export(dynamo=False)``), which needs
the ``onnx`` package; ``onnxruntime``, when installed, checks the graph against PyTorch on the export inputs.
Shapes are fixed (batch 1, one box slot): the traced geometry encoder splits its inputs with sizes frozen at
trace time, so other batch sizes or box counts are not reliable. Run one prompt per call; for text-only
prompts pass a zero box with label -10 (padding), for an exemplar box its normalised cxcywh with label 1.
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import Sam3Model, Sam3Processor

from sam3lora.inference.errors import PredictorError
from sam3lora.io import write_whole
from sam3lora.sam3 import PAD_LABEL, sam3_rows, tokenize

INPUTS = ("pixel_values", "input_ids", "attention_mask", "input_boxes", "input_boxes_labels")
OUTPUTS = ("pred_logits", "pred_boxes", "presence_logits", "pred_masks")
OPSET = 17


class OnnxUnavailableError(PredictorError):
    """The ``onnx`` package (needed by PyTorch's ONNX exporter) is not installed."""


class _RowForward(nn.Module):
    """``sam3.sam3_rows`` on plain tensors (one row per image) -> ``(pred_logits, pred_boxes, presence_logits,
    pred_masks)``."""

    def __init__(self, model: Sam3Model) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        input_boxes: torch.Tensor,
        input_boxes_labels: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        rows = {  # the contract's rows: row i is image i (one prompt per image)
            "pixel_values": pixel_values, "image_index": torch.arange(input_ids.shape[0]), "input_ids": input_ids,
            "attention_mask": attention_mask, "input_boxes": input_boxes, "input_boxes_labels": input_boxes_labels,
        }
        out = sam3_rows(self.model, rows)
        return out.pred_logits, out.pred_boxes, out.presence_logits, out.pred_masks


def check_onnx_available() -> None:
    """Raise ``OnnxUnavailableError`` with the install command when ``onnx`` is missing."""
    if importlib.util.find_spec("onnx") is None:
        raise OnnxUnavailableError(
            "--onnx needs the 'onnx' package (and 'onnxruntime' to verify the graph): "
            "pip install 'onnx>=1.16' 'onnxruntime>=1.18'"
        )


def sample_inputs(processor: Sam3Processor, label: int = PAD_LABEL, seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs of one row at the processor's size: a random image, a text, one box slot with ``label``
    (``PAD_LABEL``: padding, i.e. text only, with a zero box; 1 / 0: a positive / negative exemplar box)."""
    size = processor.image_processor.size
    g = torch.Generator().manual_seed(seed)
    input_ids, attention_mask = tokenize(processor.tokenizer, ["object"])
    box = torch.zeros(1, 1, 4) if label == PAD_LABEL else torch.tensor([[[0.5, 0.5, 0.3, 0.3]]])
    return {
        "pixel_values": torch.randn(1, 3, int(size["height"]), int(size["width"]), generator=g),
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "input_boxes": box,
        "input_boxes_labels": torch.tensor([[label]]),
    }


def export_onnx(model: Sam3Model, processor: Sam3Processor, path: str | Path, verify: bool = True) -> dict[str, Any]:
    """Trace ``model`` (float32, CPU) for one row and write ``path``; returns a description of the graph.

    The trace uses a text-only row (one padding box): traced with a real box, the padding path is frozen out.
    With ``verify`` and ``onnxruntime`` installed, runs the graph on text-only, positive-box and negative-box rows
    and raises
    ``PredictorError`` if any output differs from PyTorch by more than 1e-3; the largest difference is recorded.
    """
    check_onnx_available()
    path = Path(path)
    # the wrapper itself must be in eval mode: the exporter restores the wrapper's mode recursively afterwards
    wrapper = _RowForward(model.float().cpu()).eval()
    example = sample_inputs(processor)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        torch.onnx.export(
            wrapper, tuple(example[k] for k in INPUTS), str(path), dynamo=False, opset_version=OPSET,
            input_names=list(INPUTS), output_names=list(OUTPUTS),
        )
    info: dict[str, Any] = {
        "file": path.name,
        "opset": OPSET,
        "inputs": {k: list(v.shape) for k, v in example.items()},
        "outputs": list(OUTPUTS),
        "notes": "one (image, prompt) row per run; pixel_values: the processor's resize + normalisation; "
        "input_boxes: normalised cxcywh, label 1 = exemplar, -10 = padding (text only); pred_boxes: normalised "
        "xyxy; score = sigmoid(pred_logits) * sigmoid(presence_logits)",
        "verified_max_abs_diff": None,
    }
    if verify and importlib.util.find_spec("onnxruntime") is not None:
        info["verified_max_abs_diff"] = _verify(wrapper, processor, path)
    return info


def _verify(wrapper: _RowForward, processor: Sam3Processor, path: Path) -> float:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for seed, label in ((1, PAD_LABEL), (2, 1), (3, 0)):
        inputs = sample_inputs(processor, label=label, seed=seed)
        got = session.run(list(OUTPUTS), {k: v.numpy() for k, v in inputs.items()})
        with torch.no_grad():
            ref = wrapper(*(inputs[k] for k in INPUTS))
        worst = max(worst, *(float(np.abs(g - r.numpy()).max()) for g, r in zip(got, ref, strict=True)))
    if worst > 1e-3:
        raise PredictorError(f"{path}: ONNX outputs differ from PyTorch by up to {worst:.2e} (limit 1e-3)")
    return worst


def write_onnx_info(path: Path, info: dict[str, Any]) -> None:
    write_whole(path, json.dumps(info, indent=2))
