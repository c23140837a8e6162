"""COCO json files: read with clear errors (:func:`read_coco`), write whole (:func:`write_coco`), and the checks
every reader relies on (unique image ids, relative image paths)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sam3lora.data.data_error import DataError
from sam3lora.io import write_whole


def read_coco(path: str | Path) -> dict[str, Any]:
    """Read a COCO json and check its top-level shape.

    Requires ``images``, ``annotations`` and ``categories`` lists, each entry a dict holding the keys
    every tool relies on (``images``: id, file_name, width, height; ``annotations``: id, image_id,
    category_id, bbox; ``categories``: id, name). Raises :class:`DataError` naming the file otherwise.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "file not found")
    try:
        with path.open("r", encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(path, f"invalid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(path, f"cannot read ({e})") from None
    if not isinstance(data, dict):
        raise DataError(path, "top level must be a JSON object")
    required = {
        "images": ("id", "file_name", "width", "height"),
        "annotations": ("id", "image_id", "category_id", "bbox"),
        "categories": ("id", "name"),
    }
    for key, fields in required.items():
        if key not in data:
            raise DataError(path, f"missing key '{key}'")
        if not isinstance(data[key], list):
            raise DataError(path, f"'{key}' must be a list")
        for i, entry in enumerate(data[key]):
            if not isinstance(entry, dict):
                raise DataError(path, f"{key}[{i}] must be an object")
            missing = [f for f in fields if f not in entry]
            if missing:
                raise DataError(path, f"{key}[{i}] (id {entry.get('id', '?')}) missing key(s) {missing}")
    return data


def check_unique_ids(data: Mapping[str, Any], path: str | Path) -> None:
    """Refuse duplicate image ids (a COCO index keeps one image and gives it the annotations of both): a
    :class:`DataError` naming the file and the ids."""
    seen: set[Any] = set()
    duplicates: list[Any] = []
    for image in data["images"]:
        if image["id"] in seen and image["id"] not in duplicates:
            duplicates.append(image["id"])
        seen.add(image["id"])
    if duplicates:
        more = f" ({len(duplicates)} in all)" if len(duplicates) > 10 else ""
        raise DataError(path, f"duplicate image id(s) {duplicates[:10]}{more}")


def write_coco(data: Mapping[str, Any], path: str | Path) -> None:
    """Write a COCO dict as json, whole or not at all (``sam3lora.io.write_whole``)."""
    write_whole(path, json.dumps(data, separators=(",", ":")))


def category_index(categories: Sequence[Mapping[str, Any]]) -> dict[int, Mapping[str, Any]]:
    """``{category id: category}``."""
    return {int(c["id"]): c for c in categories}


def safe_relpath(file_name: str, where: str | Path) -> str:
    """``file_name`` as a clean relative posix path; DataError if absolute or escaping with ``..``."""
    p = Path(str(file_name).replace("\\", "/"))
    if p.is_absolute() or ".." in p.parts or not p.parts:
        raise DataError(where, f"image file_name {file_name!r} must be a relative path inside the images")
    return p.as_posix()
