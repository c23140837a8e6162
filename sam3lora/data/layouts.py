"""Dataset folder layouts: split names (``valid`` -> ``val``, ``train2017`` -> ``train``) and where each COCO layout
(Roboflow, canonical, classic) keeps its splits."""

from __future__ import annotations

import re
from pathlib import Path

from sam3lora.data.data_error import DataError

SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


def split_name(name: str) -> str | None:
    """Canonical split for a directory/file stem: train, val (from val/valid/validation), test; else None.

    A 4-digit year suffix is accepted (``train2017`` -> ``train``).
    """
    m = re.fullmatch(r"(train|val|valid|validation|test)(\d{4})?", name.lower())
    return SPLIT_ALIASES[m.group(1)] if m else None


def find_coco_splits(src: str | Path) -> dict[str, tuple[Path, Path]]:
    """``{split: (annotation json, image folder)}`` for the COCO layouts ``normalise_coco`` accepts.

    - Roboflow: ``SPLIT/_annotations.coco.json`` with the images next to it;
    - canonical: ``SPLIT/annotations.json`` + ``SPLIT/images/``;
    - classic: ``annotations/instances_SPLIT.json`` + ``SPLIT/`` or ``images/SPLIT/``.
    """
    src = Path(src)
    if not src.is_dir():
        raise DataError(src, "source directory not found")
    found: dict[str, tuple[Path, Path]] = {}

    def add(split: str, ann: Path, images: Path) -> None:
        if split in found:
            raise DataError(ann, f"second annotation file for split '{split}' (first: {found[split][0]})")
        found[split] = (ann, images)

    for d in sorted(p for p in src.iterdir() if p.is_dir()):
        split = split_name(d.name)
        if split is None:
            continue
        if (d / "_annotations.coco.json").is_file():
            add(split, d / "_annotations.coco.json", d)
        elif (d / "annotations.json").is_file():
            add(split, d / "annotations.json", d / "images")
    ann_dir = src / "annotations"
    if ann_dir.is_dir():
        for f in sorted(ann_dir.glob("instances_*.json")):
            stem = f.stem[len("instances_"):]
            split = split_name(stem)
            if split is None:
                continue
            candidates = [src / stem, src / "images" / stem, src / "images"]
            images = next((c for c in candidates if c.is_dir()), None)
            if images is None:
                raise DataError(f, f"image folder not found (looked for {', '.join(map(str, candidates))})")
            add(split, f, images)
    if not found:
        raise DataError(src, "no COCO split found (expected SPLIT/_annotations.coco.json, "
                             "annotations/instances_SPLIT.json or SPLIT/annotations.json)")
    return found
