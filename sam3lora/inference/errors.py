"""Errors of prediction, evaluation and export: each message names the file or the value that is wrong."""

from __future__ import annotations


class PredictorError(ValueError):
    """Base class: bad input to the predictor or one of the inference CLIs (one-line message)."""


class PromptError(PredictorError):
    """A prompt is unusable: empty text, no prompt at all, or a box that is malformed or outside the image."""


class ImageReadError(PredictorError):
    """An image file is missing or cannot be decoded; ``path`` names it."""

    def __init__(self, path: str, problem: str) -> None:
        self.path = path
        self.problem = problem
        super().__init__(f"{path}: {problem}")


class AdapterLoadError(PredictorError):
    """An adapter (PEFT directory or Lightning checkpoint) is missing, malformed or incomplete."""


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input rather than a bug: the CLIs print them as one line and exit 2."""
    from sam3lora.adapter import AdapterMismatchError
    from sam3lora.data.coco import DataError
    from sam3lora.lora import LoraTargetError
    from sam3lora.model import ModelLoadError

    return (PredictorError, AdapterMismatchError, ModelLoadError, LoraTargetError, DataError, FileExistsError)


def one_line(err: BaseException) -> str:
    """The message of ``err`` on one line."""
    return " ".join(str(err).split())
