"""A dataset in any layout ``convert`` reads, found and validated whole: what ``sam3lora-data validate`` runs.

:func:`find_sources` tells the layout (COCO json files first, else a YOLO ``data.yaml``) and returns its splits as
:class:`~sam3lora.data.validate.SplitSource`; :func:`validate_dataset` runs the checks of
``sam3lora.data.validate`` on all of them and never raises for bad data.
"""

from __future__ import annotations

from pathlib import Path

from sam3lora.data.data_error import DataError
from sam3lora.data.validate import Issue, Report, SplitSource, coco_sources, validate_sources
from sam3lora.data.yolo import YAML_NAMES, scan_yolo


def is_yolo(root: str | Path) -> bool:
    """Whether ``root`` is a YOLO dataset (a ``data.yaml``, or the yaml itself)."""
    root = Path(root)
    return (root.is_file() and root.suffix in (".yaml", ".yml")) or any((root / n).is_file() for n in YAML_NAMES)


def find_sources(root: str | Path, fmt: str = "auto") -> tuple[str, list[SplitSource]]:
    """``(layout, splits)`` of the dataset at ``root``: ``fmt`` ``coco``, ``yolo`` or ``auto`` (COCO json files
    first, else a ``data.yaml``). Raises :class:`DataError` when no split is found."""
    if fmt not in ("auto", "coco", "yolo"):
        raise DataError(root, f"unknown dataset format {fmt!r} (auto, coco or yolo)")
    if fmt == "coco" or (fmt == "auto" and not is_yolo(root)):
        return "coco", coco_sources(root)
    if fmt == "auto" and Path(root).is_dir():
        try:
            return "coco", coco_sources(root)
        except DataError:
            pass
    return "yolo", [s.source() for s in scan_yolo(root).splits]


def validate_dataset(root: str | Path, fmt: str = "auto") -> Report:
    """Validate every split (train/val/test) of the dataset at ``root`` in any layout ``convert`` reads (decoding
    every image whole); never raises for bad data, reports it."""
    root = Path(root)
    if not root.exists():
        return Report(root=root, errors=[Issue("-", str(root), None, "dataset directory not found")])
    try:
        layout, sources = find_sources(root, fmt)
    except DataError as e:
        return Report(root=root, errors=[Issue("-", e.path, None, e.problem)])
    report = validate_sources(sources)
    report.root, report.layout = root, layout
    present = {s.split for s in sources}
    for s in ("train", "val"):
        if s not in present:
            report.warnings.append(Issue(s, str(root), None, f"no '{s}' split"))
    return report
