"""``module.perf.compile``: ``torch.compile`` of the per-row heads and the loss leaves the step's numbers as they were.

The test compiles with dynamo's ``eager`` backend: it traces the heads (with this project's forward hooks, the DAC
pass and the host-side feature sizes) and the loss terms as ``inductor`` would, without the C++ build, which
takes minutes on a CPU. ``docs/performance.md`` has what inductor buys.
"""

from __future__ import annotations

import dataclasses

import pytest
from test_perf import assert_same_step, batch_for, build_module, loss_and_grads

from sam3lora.perf.compile import COMPILED_HEADS, CompileSettingsError, compile_options


def test_compiled_heads_and_loss_give_the_same_step() -> None:
    module = build_module("lora=balanced")
    batch = batch_for(module)
    ref_loss, ref_grads = loss_and_grads(module, batch)
    module.configure_perf(dataclasses.replace(module.perf, compile={"backend": "eager"}))
    heads = [module.base_model.get_submodule(name) for name in COMPILED_HEADS]
    assert all(head._compiled_call_impl is not None for head in heads)
    assert module.criterion._compiled_dense_terms is not None
    loss, grads = loss_and_grads(module, batch)
    assert_same_step(loss, grads, ref_loss, ref_grads)
    module.configure_perf(dataclasses.replace(module.perf, compile=False))  # switched off: eager again
    assert all(head._compiled_call_impl is None for head in heads)
    assert module.criterion._compiled_dense_terms is None


def test_compile_setting_is_validated() -> None:
    assert compile_options(False) is None and compile_options(True) == {}
    assert compile_options({"backend": "aot_eager", "mode": None}) == {"backend": "aot_eager"}
    with pytest.raises(CompileSettingsError, match="module.perf.compile: unknown key"):
        compile_options({"backend": "eager", "speed": "max"})
    with pytest.raises(CompileSettingsError, match="module.perf.compile: true, false or a mapping"):
        compile_options("fast")
