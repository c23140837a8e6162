"""Example images the demo offers: a folder of the user's, or a few synthetic shapes generated once."""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from sam3lora.data.synthetic_shapes import write_synthetic
from sam3lora.inference.images import find_images
from sam3lora.model.tiny import sam3lora_home

SYNTHETIC_SEED = 7  # not the training seeds (0 and 1 per split): the examples are unseen images


@dataclass(frozen=True)
class Example:
    """One example: an image file and the text prompts to try on it (comma-separated, may be empty)."""

    image: Path
    prompt: str = ""


def folder_examples(folder: str | Path, limit: int = 12) -> list[Example]:
    """The first ``limit`` image files of ``folder`` (sorted), with no prompt."""
    return [Example(p) for p in find_images([str(folder)])[:limit]]


def synthetic_examples(
    root: str | Path | None = None, count: int = 3, size: int = 224, categories: list[str] | None = None
) -> list[Example]:
    """``count`` synthetic shape images of ``categories`` (default: the generator's; written once under
    ``$SAM3LORA_HOME/demo-examples[-<hash of the categories>]``), each prompted with the categories it shows (at
    most two, e.g. ``"red circle, blue square"``)."""
    if root is None:
        tag = "-" + hashlib.sha1("|".join(categories).encode()).hexdigest()[:8] if categories else ""
        root = sam3lora_home() / f"demo-examples{tag}"
    root = Path(root)
    split = root / "val"
    if not (split / "annotations.json").is_file():
        with contextlib.suppress(FileExistsError):  # another process wrote it first
            write_synthetic(root, train=0, val=count, size=size, seed=SYNTHETIC_SEED, overwrite=True,
                            categories=categories)
    data = json.loads((split / "annotations.json").read_text())
    names = {c["id"]: c["name"] for c in data["categories"]}
    examples = []
    for image in data["images"][:count]:
        present = sorted({a["category_id"] for a in data["annotations"] if a["image_id"] == image["id"]})
        prompt = ", ".join(names[c] for c in present[:2]) or next(iter(names.values()))
        examples.append(Example(split / "images" / image["file_name"], prompt))
    return examples
