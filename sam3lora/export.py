"""Merge an adapter into its base and save a plain transformers directory (no sam3lora needed to load it)."""

from __future__ import annotations

from pathlib import Path

from peft import PeftModel
from transformers import Sam3Processor

from sam3lora.io import atomic_dir
from sam3lora.model.loading import DTYPES


def export_merged(
    model: PeftModel,
    processor: Sam3Processor,
    out_dir: str | Path,
    dtype: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Merge the active adapter into the base weights and ``save_pretrained`` model + processor to ``out_dir``.

    The merge happens in place (``merge_and_unload``): ``model`` is consumed. ``dtype`` casts the saved weights
    (``bfloat16 | float16 | float32``). The directory is written whole: temporary directory, then rename.
    """
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        merged = model.merge_and_unload()
        if dtype is not None:
            merged = merged.to(DTYPES[dtype])
        merged.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return Path(out_dir)
