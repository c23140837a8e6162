"""The project's errors: one base class, and how the command-line tools report them.

Every error that means "bad input" (a file, a config value, a model that cannot be loaded) derives from
:class:`Sam3LoRAError`; its message is one line naming the file, key or value and the problem. The console scripts
print such an error as ``<prog>: error: <message>`` on stderr and exit with status 2 (:func:`exit_status`);
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any


class Sam3LoRAError(Exception):
    """Base class of sam3lora's user-facing errors (bad input, not a bug)."""


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions the CLIs report on one line with exit status 2: ours, and an output that already exists."""
    return (Sam3LoRAError, FileExistsError)


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
