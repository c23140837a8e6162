"""Count the host-device synchronisations of a piece of code, on any machine (the CPU included).

On a GPU the host waits for the device whenever it needs a value the device computes: a tensor's value read into
Python (``.item()``, ``bool(t)``, ``int(t)``: ``aten._local_scalar_dense``), an output whose size depends on the
data (``nonzero``, boolean-mask indexing (counted as ``nonzero``), ``unique``, ``masked_select``) and every copy
to the host (``.cpu()``, ``.tolist()``). :class:`SyncCounter` counts these operations while it is active, whatever
the device, so that a test on the CPU guards the number a GPU step would pay. On the CPU every tensor is a host
tensor, so the count is an upper bound: a ``.cpu()`` of a tensor that is on the CPU anyway counts too. Copies to
the host are counted as ``.cpu()`` and ``.tolist()`` only: on the CPU ``.to("cpu")`` cannot be told from the free
``.to(t.device)``, so code that means a device->host copy says ``.cpu()``.
"""

from __future__ import annotations

import traceback
from collections import Counter
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

#: aten operators (overload packet names) that make the host wait for the device.
SYNC_OPS = frozenset(
    {"_local_scalar_dense", "nonzero", "_unique2", "unique_dim", "unique_consecutive", "masked_select"}
)
#: aten operators that take a list of indices: a boolean index among them has a data-dependent size
MASK_INDEXING = frozenset({"index", "index_put", "index_put_", "_index_put_impl_"})
#: Tensor methods that copy to the host (not seen by the dispatcher on the CPU, where they are no-ops).
HOST_COPIES = frozenset({"cpu", "tolist"})


def _has_bool_index(args: tuple) -> bool:
    """Whether an ``aten.index``-like call (``args[1]``: a list of optional index tensors) has a boolean index."""
    indices = args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else ()
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices)


def _caller() -> str:
    """``file:line`` of the innermost frame outside torch and this module."""
    for frame in reversed(traceback.extract_stack()):
        if "/torch/" not in frame.filename and not frame.filename.endswith("syncs.py"):
            return f"{frame.filename.rsplit('site-packages/', 1)[-1]}:{frame.lineno}"
    return "?"


class _DispatchCounter(TorchDispatchMode):
    def __init__(self, owner: SyncCounter) -> None:
        super().__init__()
        self.owner = owner

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = func.overloadpacket.__name__
        if name in SYNC_OPS:
            self.owner.record(name)
        elif name in MASK_INDEXING and _has_bool_index(args):
            self.owner.record("nonzero")  # a boolean mask index becomes nonzero inside the operator
        return func(*args, **(kwargs or {}))


class _FunctionCounter(TorchFunctionMode):
    def __init__(self, owner: SyncCounter) -> None:
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in HOST_COPIES:
            self.owner.record(name)
        return func(*args, **kwargs)


class SyncCounter:
    """Context manager counting synchronising operations (``SYNC_OPS`` and ``HOST_COPIES``) while it is active.

    ``total`` is the number of operations, ``by_op`` per operation name, ``by_site`` per ``op file:line`` (the
    innermost caller outside torch; ``where=False`` skips the stack walk).
    """

    def __init__(self, where: bool = True) -> None:
        self.where = where
        self.by_op: Counter[str] = Counter()
        self.by_site: Counter[str] = Counter()
        self._modes = (_FunctionCounter(self), _DispatchCounter(self))

    def record(self, name: str) -> None:
        self.by_op[name] += 1
        if self.where:
            self.by_site[f"{name} {_caller()}"] += 1

    @property
    def total(self) -> int:
        return sum(self.by_op.values())

    def __enter__(self) -> SyncCounter:
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
