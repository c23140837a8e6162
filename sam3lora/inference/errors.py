"""Errors of prediction, evaluation and export: each message names the file or the value that is wrong."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any


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


def exit_status(prog: str, run: Callable[..., Any], *args: Any) -> int:
    """The exit status of ``run(*args)``: its result if that is an int, else 0; a user error
    (:func:`user_errors`) is printed on one line as ``<prog>: error: ...`` on stderr and gives 2."""
    try:
        status = run(*args)
    except user_errors() as err:
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
        return 2
    return status if isinstance(status, int) else 0
