"""Evaluation reports: a Markdown table, a bar chart and atomic file writes."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sam3lora.io import write_whole

# column -> (metric key, format); IoU, Dice and AP are fractions, cgF1 / pmF1 x100, IL_MCC in [-1, 1]
COLUMNS: dict[str, tuple[str, str]] = {
    "IoU": ("iou", "{:.3f}"),
    "Dice": ("dice", "{:.3f}"),
    "box AP": ("bbox_AP", "{:.3f}"),
    "box AP50": ("bbox_AP50", "{:.3f}"),
    "box AP75": ("bbox_AP75", "{:.3f}"),
    "mask AP": ("segm_AP", "{:.3f}"),
    "mask AP50": ("segm_AP50", "{:.3f}"),
    "mask AP75": ("segm_AP75", "{:.3f}"),
    "cgF1": ("cgF1", "{:.1f}"),
    "IL_MCC": ("IL_MCC", "{:.2f}"),
    "pmF1": ("pmF1", "{:.1f}"),
}
# bar chart: metric key -> (label, factor to a 0-100 scale)
CHART: dict[str, tuple[str, float]] = {
    "iou": ("IoU", 100.0), "dice": ("Dice", 100.0), "bbox_AP": ("box AP", 100.0), "segm_AP": ("mask AP", 100.0),
    "cgF1": ("cgF1", 1.0), "IL_MCC": ("IL_MCC", 100.0), "pmF1": ("pmF1", 1.0),
}


def markdown_table(results: Mapping[str, Mapping[str, float]], title: str) -> str:
    """Markdown: one row per model, one column per metric, then a line explaining the scales."""
    lines = [f"### {title}", "", "| model | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for name, metrics in results.items():
        cells = [fmt.format(metrics[key]) if key in metrics else "-" for key, fmt in COLUMNS.values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "IoU / Dice: mean over ground-truth instances of their matched prediction (score >= threshold, missed = 0). "
        "AP: COCO (pycocotools), 0-1. cgF1 and pmF1 x100, IL_MCC in [-1, 1] (SAM 3's scales).",
    ]
    return "\n".join(lines) + "\n"


def write_json(path: Path, data: Any) -> Path:
    return write_whole(path, json.dumps(data, indent=2))


def bar_chart(results: Mapping[str, Mapping[str, float]], path: Path, title: str) -> Path:
    """Grouped bars per metric (all on a 0-100 scale), one colour per model, saved as PNG."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(CHART)
    names = list(results)
    width = 0.8 / max(len(names), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(keys) + 0.4 * len(names)), 4.0))
    for i, name in enumerate(names):
        values = [results[name].get(k, 0.0) * CHART[k][1] for k in keys]
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(keys))]
        bars = ax.bar(xs, values, width=width, label=name)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(range(len(keys)), [CHART[k][0] for k in keys])
    ax.set_ylabel("score (0-100; IL_MCC x100)")
    ax.set_title(title)
    ax.axhline(0, color="black", linewidth=0.5)
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return write_whole(path, buffer.getvalue())
