"""Merge an adapter into its base and save a plain transformers directory (no sam3lora needed to load it)."""

from __future__ import annotations

from pathlib import Path

from peft import PeftModel
from transformers import Sam3Processor

from sam3lora.adapter import read_adapter_facts
from sam3lora.io import atomic_dir
from sam3lora.model.load_base import DTYPES
from sam3lora.model_card import merged_card_facts, write_merged_card


def export_merged(
    model: PeftModel,
    processor: Sam3Processor,
    out_dir: str | Path,
    dtype: str | None = None,
    overwrite: bool = False,
    adapter: str | Path | None = None,
    shared_as: str | Path | None = None,
) -> Path:
    """Merge the active adapter into the base weights and ``save_pretrained`` model + processor to ``out_dir``,
    with a model card (``README.md``, ``sam3lora.model_card``).

    The merge happens in place (``merge_and_unload``): ``model`` is consumed. ``dtype`` casts the saved weights
    (``bfloat16 | float16 | float32``). ``adapter``: the adapter directory or checkpoint ``model`` holds, whose
    recorded facts (base, data, training, evaluation) the card repeats; ``shared_as``: the folder the card's usage
    code names (default ``out_dir``). The directory is written whole: temporary directory, then rename.
    """
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    recorded = read_adapter_facts(adapter) if adapter is not None else {}
    facts = merged_card_facts(model, adapter, shared_as or out_dir, recorded)  # the LoRA layout, read before merging
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        merged = model.merge_and_unload()
        if dtype is not None:
            merged = merged.to(DTYPES[dtype])
        merged.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        write_merged_card(tmp, facts, merged, dtype or "float32")
    return Path(out_dir)
