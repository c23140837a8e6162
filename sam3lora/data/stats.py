"""``sam3lora-data stats``: per-split, per-category statistics and an example grid with masks drawn."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from rich.console import Console
from rich.table import Table

from sam3lora.data.coco_json import read_coco, safe_relpath
from sam3lora.data.data_error import DataError
from sam3lora.data.masks import annotation_to_mask
from sam3lora.io import atomic_file

SPLITS = ("train", "val", "test")


@dataclass
class CategoryStats:
    """One category in one split: images containing it, instances, mean mask (or box) area / image area."""

    name: str
    images: int = 0
    instances: int = 0
    mean_area_fraction: float = 0.0
    box_only: int = 0


def _splits(root: Path) -> list[str]:
    found = [s for s in SPLITS if (root / s / "annotations.json").is_file()]
    if not found:
        raise DataError(root, "no SPLIT/annotations.json found")
    return found


def dataset_stats(root: str | Path) -> dict[str, list[CategoryStats]]:
    """``{split: [CategoryStats per category, in json order]}``; crowd annotations are not counted."""
    root = Path(root)
    out: dict[str, list[CategoryStats]] = {}
    for split in _splits(root):
        data = read_coco(root / split / "annotations.json")
        sizes = {im["id"]: float(im["width"]) * float(im["height"]) for im in data["images"]}
        stats = {c["id"]: CategoryStats(c["name"]) for c in data["categories"]}
        fractions: dict[int, list[float]] = {cid: [] for cid in stats}
        images: dict[int, set[int]] = {cid: set() for cid in stats}
        for ann in data["annotations"]:
            cid = ann["category_id"]
            if ann.get("iscrowd", 0) or cid not in stats or ann["image_id"] not in sizes:
                continue
            s = stats[cid]
            s.instances += 1
            images[cid].add(ann["image_id"])
            box_only = ann.get("segmentation") in ([], None)
            s.box_only += int(box_only)
            area = ann["bbox"][2] * ann["bbox"][3] if box_only else ann.get("area", 0.0)
            fractions[cid].append(float(area) / max(sizes[ann["image_id"]], 1.0))
        for cid, s in stats.items():
            s.images = len(images[cid])
            s.mean_area_fraction = float(np.mean(fractions[cid])) if fractions[cid] else 0.0
        out[split] = list(stats.values())
    return out


def print_stats(stats: dict[str, list[CategoryStats]], console: Console | None = None) -> None:
    """Print one rich table per split."""
    console = console or Console()
    for split, rows in stats.items():
        table = Table(title=f"{split}")
        table.add_column("category")
        for col in ("images", "instances", "mean area %", "box-only"):
            table.add_column(col, justify="right")
        for r in rows:
            table.add_row(r.name, str(r.images), str(r.instances), f"{100 * r.mean_area_fraction:.2f}",
                          str(r.box_only))
        console.print(table)


def write_examples_png(root: str | Path, png: str | Path, split: str | None = None, count: int = 8,
                       columns: int = 4) -> Path:
    """Save a grid of the first ``count`` images of ``split`` (default: the first split) with their masks
    (and boxes) drawn and category names, via matplotlib's Agg backend. Written whole (temp + rename).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    root, png = Path(root), Path(png)
    split = split or _splits(root)[0]
    data = read_coco(root / split / "annotations.json")
    names = {c["id"]: c["name"] for c in data["categories"]}
    chosen = data["images"][:count]
    if not chosen:
        raise DataError(root / split / "annotations.json", "no images to draw")
    rows = (len(chosen) + columns - 1) // columns
    cols = min(columns, len(chosen))
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
    cmap = plt.get_cmap("tab10")
    for ax in axes.ravel():
        ax.axis("off")
    for ax, im in zip(axes.ravel(), chosen, strict=False):
        path = root / split / "images" / safe_relpath(im["file_name"], root / split / "annotations.json")
        try:
            with Image.open(path) as pil:
                rgb = np.asarray(pil.convert("RGB"), dtype=np.float32) / 255.0
        except OSError as e:
            plt.close(fig)
            raise DataError(path, f"cannot read image ({e})") from None
        h, w = rgb.shape[:2]
        anns = [a for a in data["annotations"] if a["image_id"] == im["id"] and not a.get("iscrowd", 0)]
        for k, ann in enumerate(anns):
            colour = np.array(cmap(k % 10)[:3])
            mask = annotation_to_mask(ann.get("segmentation"), h, w)
            rgb[mask] = 0.45 * rgb[mask] + 0.55 * colour
            x, y, bw, bh = ann["bbox"]
            ax.add_patch(Rectangle((x, y), bw, bh, fill=False, edgecolor=colour, linewidth=1))
            ax.text(x, y, names.get(ann["category_id"], "?"), color="white", fontsize=6,
                    bbox={"facecolor": colour, "alpha": 0.7, "pad": 1, "linewidth": 0})
        ax.imshow(rgb)
        ax.set_title(f"{im['file_name']} ({len(anns)})", fontsize=7)
    fig.tight_layout()
    try:
        with atomic_file(png) as tmp:
            fig.savefig(tmp, dpi=100, format="png")
    finally:
        plt.close(fig)
    return png
