"""Bytes that autograd keeps for backward, per SAM 3 component: the activation memory of a training step.

:class:`SavedBytes` counts, while a forward pass runs, every tensor that autograd saves for backward
(``torch.autograd.graph.saved_tensors_hooks``) and attributes it to the component whose forward is running: a
stack kept by forward pre/post hooks on the modules of each component (``COMPONENT_MODULES``), so that a
sub-module called from outside its component (the DAC pass calls ``mask_decoder.mask_embedder`` directly) still
counts where it belongs. Code outside every component counts as ``other`` (``Sam3Model.forward``'s glue), or
under a label given with :meth:`SavedBytes.label` (the benchmark labels the criterion ``loss``).

Counting rules:

- each storage counts once (``untyped_storage().data_ptr()``), whole (a saved view keeps its whole base alive),
  attributed to the component that saved it first;
- the model's own parameters and buffers do not count (they exist anyway); per-step copies of them (a cast under
  autocast, PEFT's input cast) do;
- a saved tensor that is no longer referenced when the report is made (its graph was dropped: an output nobody
  uses) does not count;
- activation checkpointing: autograd's hooks are nested, so tensors saved inside a checkpointed block go to the
  checkpoint (which keeps nothing) and never reach this counter; what a checkpointed block does keep is its
  inputs (the recomputation replays them), which are counted when the block is called (forward pre-hooks on the
  modules that checkpoint), under the block's component.

Copies (``find_copies=True``): a saved tensor whose values equal a frozen parameter cast to another dtype
(autocast's per-step copies of base weights) counts under ``copies["weight_casts"]``; one whose values equal an
earlier saved tensor of the same shape and dtype in another storage (the same activation saved twice, e.g. cast
twice, or computed twice) under ``copies["duplicates"]``. Constant tensors (all values equal, e.g. masks of
ones, zero-initialised LoRA B) are not compared: their equality is a coincidence. Casts of the float32 LoRA
weights are not copies (autocast makes one per step, r x d each). Both are included in ``by_component`` too.

The numbers are what the graph holds at the end of the forward (and the loss), i.e. the activation part of the
peak memory of a training step; gradients, optimiser state and temporaries freed during the forward are not in it.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from sam3lora.lora import unwrap_base
from sam3lora.perf.checkpointing import checkpoint_kept_inputs

#: Components of ``Sam3Model`` in the order they run, and the top-level modules each one covers.
COMPONENT_MODULES: dict[str, tuple[str, ...]] = {
    "vision_encoder": ("vision_encoder",),
    "text_encoder": ("text_encoder", "text_projection"),
    "geometry_encoder": ("geometry_encoder",),
    "detr_encoder": ("detr_encoder",),
    "detr_decoder": ("detr_decoder", "dot_product_scoring"),
    "mask_decoder": ("mask_decoder",),
}
COMPONENTS = tuple(COMPONENT_MODULES)
OTHER = "other"
LOSS = "loss"


def _tensors(value: Any) -> Iterator[Tensor]:
    """Every tensor in a (nested) structure of tuples, lists, dicts and ``ModelOutput``s."""
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


@dataclass
class _Saved:
    component: str
    storage: int
    nbytes: int
    ref: Any  # weakref to the saved tensor (None: always alive, e.g. a checkpoint's input)
    kind: str  # "saved" (through autograd's pack hook) or "checkpoint_input"


@dataclass
class SavedBytesReport:
    """Bytes saved for backward per component (``by_component``), split into what autograd saved and the inputs
    that checkpointed blocks keep (``checkpoint_inputs``), for a forward over ``images`` images / ``rows`` rows."""

    by_component: dict[str, int]
    checkpoint_inputs: dict[str, int]
    images: int = 1
    rows: int = 1
    tensors: int = 0
    meta: dict[str, Any] = field(default_factory=dict)
    copies: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.by_component.values())

    def per_image(self) -> dict[str, float]:
        """Component -> bytes per image, plus ``total``."""
        out = {k: v / self.images for k, v in self.by_component.items()}
        out["total"] = self.total / self.images
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "images": self.images, "rows": self.rows, "tensors": self.tensors, "total_bytes": self.total,
            "bytes": dict(self.by_component), "checkpoint_input_bytes": dict(self.checkpoint_inputs),
            "bytes_per_image": self.per_image(), "copy_bytes": dict(self.copies), **self.meta,
        }


class SavedBytes:
    """Count the bytes autograd saves for backward, per component, while recording.

    Usage::

        counter = SavedBytes(module.model)
        with counter.recording():
            outputs = module(batch)
            with counter.label("loss"):
                loss = criterion(outputs, batch.targets)["loss"]
        report = counter.report(images=batch.num_images)  # before backward frees the graph
        counter.remove()

    Args:
        model: ``Sam3Model`` or a PEFT model around one.
        components: subset of ``COMPONENTS`` to attribute (the others count as ``other``).
        groups: instead of ``components``: name -> module paths of the base model, e.g. one group per ViT layer.
            Where groups nest, the later one wins (list ``vision_encoder`` before its layers).
        find_copies: also report saved weight casts and duplicated activations (``SavedBytesReport.copies``;
            compares values, so meant for small models and tests).
    """

    def __init__(
        self,
        model: nn.Module,
        components: Sequence[str] = COMPONENTS,
        groups: Mapping[str, Sequence[str]] | None = None,
        find_copies: bool = False,
    ) -> None:
        self.model = model
        self.find_copies = find_copies
        base = unwrap_base(model)
        self._stack: list[str] = []
        self._records: list[_Saved] = []
        self._recording = False
        self._excluded = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
        self._handles: list[Any] = []
        if groups is None:
            groups = {c: COMPONENT_MODULES[c] for c in components}
        self.groups = list(groups)
        for component, paths in groups.items():
            for path in paths:
                try:
                    root = base.get_submodule(path)
                except AttributeError:
                    continue
                for module in root.modules():
                    self._handles.append(module.register_forward_pre_hook(self._push(component), with_kwargs=True))
                    self._handles.append(module.register_forward_hook(self._pop, always_call=True))

    # -------------------------------------------------------------------------------------------- hooks
    def _push(self, component: str) -> Any:
        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            self._stack.append(component)
            if self._recording and getattr(module, "gradient_checkpointing", False) and module.training and (
                torch.is_grad_enabled()
            ):  # a block that checkpoints keeps its inputs for the recomputation, if it has a backward at all
                inputs = list(_tensors(checkpoint_kept_inputs(module, args, kwargs)))
                if any(t.requires_grad for t in inputs) or any(p.requires_grad for p in module.parameters()):
                    for tensor in inputs:
                        self._add(tensor, None, "checkpoint_input")

        return hook

    def _pop(self, _module: nn.Module, _args: Any, _output: Any) -> None:
        if self._stack:
            self._stack.pop()

    def _current(self) -> str:
        return self._stack[-1] if self._stack else OTHER

    def _add(self, tensor: Tensor, ref: Any, kind: str) -> None:
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        if ptr == 0 or ptr in self._excluded or tensor.device.type == "meta":
            return
        self._records.append(_Saved(self._current(), ptr, storage.nbytes(), ref, kind))

    def _pack(self, tensor: Tensor) -> Tensor:
        # a detached alias (same storage, no copy): packing a node's own output as is would tie the node to its
        # output in a reference cycle, and the alias lives exactly as long as the graph that saved it
        packed = tensor.detach()
        if self._recording:
            self._add(packed, weakref.ref(packed), "saved")
        return packed

    @staticmethod
    def _unpack(tensor: Tensor) -> Tensor:
        return tensor

    # -------------------------------------------------------------------------------------------- use
    @contextlib.contextmanager
    def recording(self) -> Iterator[SavedBytes]:
        """Count what forwards (and losses) save inside this block; starts a fresh count."""
        self._records.clear()
        self._stack.clear()
        self._recording = True
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
                yield self
        finally:
            self._recording = False
            self._stack.clear()

    @contextlib.contextmanager
    def label(self, name: str) -> Iterator[None]:
        """Attribute what is saved inside this block (outside every component) to ``name``, e.g. ``loss``."""
        self._stack.append(name)
        try:
            yield
        finally:
            self._stack.pop()

    def report(self, images: int = 1, rows: int = 1, **meta: Any) -> SavedBytesReport:
        """What is still saved now (call before backward), each storage once, per component."""
        owner: dict[int, tuple[str, int, str]] = {}
        for rec in self._records:
            if rec.ref is not None and rec.ref() is None:
                continue  # its graph is gone: nothing keeps it for backward
            if rec.storage not in owner:
                owner[rec.storage] = (rec.component, rec.nbytes, rec.kind)
        by_component: dict[str, int] = {}
        ckpt: dict[str, int] = {}
        for component, nbytes, kind in owner.values():
            by_component[component] = by_component.get(component, 0) + nbytes
            if kind == "checkpoint_input":
                ckpt[component] = ckpt.get(component, 0) + nbytes
        order = [*self.groups, OTHER, LOSS]
        ordered = {k: by_component[k] for k in sorted(by_component, key=lambda k: (order + [k]).index(k))}
        copies = self._copies() if self.find_copies else {}
        return SavedBytesReport(ordered, ckpt, images=images, rows=rows, tensors=len(owner), meta=dict(meta),
                                copies=copies)

    def _copies(self) -> dict[str, int]:
        """Bytes of saved weight casts and of saved duplicates of other saved tensors (see the module doc)."""
        alive: dict[int, Tensor] = {}
        for rec in self._records:
            tensor = rec.ref() if rec.ref is not None else None
            if tensor is not None and tensor.is_floating_point() and rec.storage not in alive:
                alive[rec.storage] = tensor
        params: dict[tuple[int, ...], list[Tensor]] = {}
        for param in self.model.parameters():
            if not param.requires_grad:
                params.setdefault(tuple(param.shape), []).append(param.detach())

        def is_weight_cast(t: Tensor) -> bool:
            for view in (t, t.mT) if t.ndim == 2 else (t,):  # a matmul saves the transposed weight
                for param in params.get(tuple(view.shape), []):
                    if param.dtype != view.dtype and torch.equal(param.to(view.dtype), view):
                        return True
            return False

        copies = {"weight_casts": 0, "duplicates": 0}
        seen: dict[tuple[Any, ...], list[Tensor]] = {}
        with torch.no_grad():
            for tensor in alive.values():
                nbytes = tensor.untyped_storage().nbytes()
                if tensor.numel() < 2 or bool(tensor.min() == tensor.max()):
                    continue
                if is_weight_cast(tensor):
                    copies["weight_casts"] += nbytes
                    continue
                same = seen.setdefault((tuple(tensor.shape), tensor.dtype), [])
                if any(torch.equal(tensor, other) for other in same):
                    copies["duplicates"] += nbytes
                else:
                    same.append(tensor)
        return copies

    def remove(self) -> None:
        """Remove every hook from the model."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> SavedBytes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
