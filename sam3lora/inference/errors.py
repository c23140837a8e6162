"""Errors of prediction, evaluation and export: each message names the file or the value that is wrong."""

from __future__ import annotations

__all__ = ["AdapterLoadError", "ImageReadError", "PredictorError", "PromptError"]

from sam3lora.adapter import AdapterLoadError  # adapter identity lives in sam3lora.adapter
from sam3lora.errors import Sam3LoRAError


class PredictorError(Sam3LoRAError, ValueError):
    """Base class: bad input to the predictor or one of the inference CLIs (one-line message)."""


class PromptError(PredictorError):
    """A prompt is unusable: empty text, no prompt at all, or a box that is malformed or outside the image."""


class ImageReadError(PredictorError):
    """An image file is missing or cannot be decoded; ``path`` names it."""

    def __init__(self, path: str, problem: str) -> None:
        self.path = path
        self.problem = problem
        super().__init__(f"{path}: {problem}")
