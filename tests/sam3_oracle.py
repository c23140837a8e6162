"""Meta's official SAM 3 code as a test oracle: its loss, matcher and eval modules, imported from the files of its
published wheel (``make oracle`` puts them under ``.venv/oracle/sam3-<version>``; ``$SAM3_ORACLE`` may point
elsewhere), never installed: the package pins numpy<2 and ftfy==6.1.1, and its ``__init__`` imports the whole
model (timm, ...). A bare ``sam3`` package object whose ``__path__`` is the wheel's folder lets Python import
``sam3.train.loss.*``, ``sam3.train.matcher`` and ``sam3.eval.*`` without running ``sam3/__init__.py``.

The official focal loss is a Triton kernel. It runs here on the CPU through Triton's interpreter
(``TRITON_INTERPRET=1``), with one shim: the interpreter has no ``libdevice.pow``, so ``pow(x, y)`` becomes
``exp(y * log(x))`` (the kernel calls it on ``1 - p_t`` with ``gamma = 2``: equal to float rounding, 0 at
``x = 0``). Forward and backward kernels are otherwise Meta's.
"""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def oracle_dir() -> Path:
    """The folder holding the official ``sam3`` package files; fails (never skips) when it is missing."""
    env = os.environ.get("SAM3_ORACLE")
    candidates = [Path(env)] if env else sorted((ROOT / ".venv" / "oracle").glob("sam3-*"))
    for path in candidates:
        if (path / "sam3" / "train" / "loss" / "sam3_loss.py").is_file():
            return path
    pytest.fail("the official sam3 package files are missing: run `make oracle` (make test does it)", pytrace=False)


def load_official() -> types.SimpleNamespace:
    """Import the official modules once: ``loss_fns``, ``sam3_loss``, ``matcher``, ``model_misc``, ``cgf1_eval``."""
    if "sam3" not in sys.modules:
        if os.environ.get("TRITON_INTERPRET") != "1":  # conftest sets it before triton.language is imported
            pytest.fail("TRITON_INTERPRET=1 must be set before triton is imported (tests/conftest.py)", pytrace=False)
        package = types.ModuleType("sam3")
        package.__path__ = [str(oracle_dir() / "sam3")]
        sys.modules["sam3"] = package
        import sam3.train.loss.sigmoid_focal_loss as kernels
        import triton.language as tl

        kernels.libdevice = types.SimpleNamespace(pow=lambda x, y: tl.exp(y * tl.log(x)))
    import sam3.eval.cgf1_eval as cgf1_eval
    import sam3.model.model_misc as model_misc
    import sam3.train.loss.loss_fns as loss_fns
    import sam3.train.loss.sam3_loss as sam3_loss
    import sam3.train.matcher as matcher

    return types.SimpleNamespace(
        loss_fns=loss_fns, sam3_loss=sam3_loss, matcher=matcher, model_misc=model_misc, cgf1_eval=cgf1_eval
    )
