"""User-facing data errors: :class:`DataError` (``"<file>: <problem>"``) and :class:`DataWarning`."""

from __future__ import annotations

import os

from sam3lora.errors import Sam3LoRAError


class DataError(Sam3LoRAError):
    """Bad user input: ``str(err)`` is ``"<file>: <problem>"``; ``path`` and ``problem`` are kept apart."""

    def __init__(self, path: str | os.PathLike[str], problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class DataWarning(UserWarning):
    """A recoverable problem in user data (printed as ``warning: ...`` by the CLI)."""
