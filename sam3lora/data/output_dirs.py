"""Directories the data tools write: refused when they would destroy something, written whole (``atomic_dir``),
marked as written by sam3lora (only such sets are ever replaced)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

from sam3lora.data.data_error import DataError
from sam3lora.io import atomic_dir


def check_output_dir(out: str | Path, overwrite: bool) -> Path:
    """Refuse an ``out`` that is a file, or a non-empty directory unless ``overwrite``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(out, "exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise DataError(out, "output directory is not empty (pass overwrite / --overwrite to replace it)")
    return out


def check_not_nested(src: str | Path, out: str | Path) -> None:
    """Refuse an ``out`` equal to, inside, or containing ``src`` (replacing it would destroy the input)."""
    s, o = Path(src).resolve(), Path(out).resolve()
    if s == o or s in o.parents or o in s.parents:
        raise DataError(out, f"output directory must not overlap the input directory {src}")


CONVERTED_MARKER = ".sam3lora-converted"  # written into every converted set: only sets sam3lora wrote are replaced
OWN_MARKERS = (CONVERTED_MARKER, ".sam3lora-synthetic")


def check_replaceable(out: str | Path, overwrite: bool) -> Path:
    """Refuse a non-empty ``out`` unless sam3lora wrote it (it holds :data:`CONVERTED_MARKER` or the synthetic
    writer's marker) and ``overwrite`` is given: any other directory is never replaced, whatever the flags."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(out, "exists and is not a directory")
    if not out.is_dir() or not any(out.iterdir()):
        return out
    if not any((out / m).is_file() for m in OWN_MARKERS):
        raise DataError(out, f"output directory is not empty and was not written by sam3lora (no {CONVERTED_MARKER} "
                             "file): it is never replaced; choose another directory")
    if not overwrite:
        raise DataError(out, "output directory is not empty: a set converted earlier "
                             "(pass overwrite / --overwrite to replace it)")
    return out


def write_marker(directory: Path, source_format: str, source: str | Path) -> None:
    """Write :data:`CONVERTED_MARKER` into a converted set (its format and source)."""
    record = {"written_by": "sam3lora-data convert", "format": source_format, "source": str(source)}
    (directory / CONVERTED_MARKER).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


@contextlib.contextmanager
def output_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """``sam3lora.io.atomic_dir`` after ``check_output_dir`` (whose errors name the directory)."""
    with atomic_dir(check_output_dir(out, overwrite), overwrite=True) as tmp:
        yield tmp
