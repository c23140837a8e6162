"""The demo's prediction logic, without Gradio: checked uploads, prompt and box parsing, one run of every model.

``DemoService.predict`` runs the base and each loaded adapter on one image with the same prompts and returns a
``DemoResult``: one overlay per model, an instance table, a masks archive and a COCO json. Bad input raises
``DemoError`` (a ``PredictorError``) or another ``sam3lora.inference.errors.user_errors()`` with a one-line
message naming the problem; the app shows it in the page.
"""

from __future__ import annotations

import atexit
import re
import shutil
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw, UnidentifiedImageError

from sam3lora.data.images import to_rgb8
from sam3lora.inference.draw import overlay
from sam3lora.inference.errors import PredictorError, PromptError
from sam3lora.inference.images import ImageInput, to_pil
from sam3lora.inference.predictor import (
    PromptResult,
    Sam3LoRAPredictor,
    check_boxes_inside,
    make_prompts,
    parse_box,
    prompt_slug,
)
from sam3lora.inference.records import detection_records, results_document, write_json

BASE = "base"  # the label of the base model (no adapter); adapters may not use it
ROW_HEADERS = ("model", "prompt", "instance", "score", "box x0,y0,x1,y1", "area px")
MAX_INSTANCES = 50  # per model and prompt, best first (bounds mask memory at threshold 0)
KEEP_RUNS = 8  # output folders kept on disk; Gradio copies the downloads into its own cache
MAX_PROMPTS = 16  # text prompts per request: one request holds the only worker
MAX_BOXES = 16  # exemplar boxes per request
Progress = Callable[[float, str], None]


class DemoError(PredictorError):
    """Bad input to the demo: an upload that is not an image or too large, an unparsable prompt or box."""


@dataclass(frozen=True)
class UploadLimits:
    """What uploads the demo accepts: at most ``max_side`` px per side and ``max_megabytes`` MiB per file."""

    max_side: int = 2048
    max_megabytes: float = 20.0


DEFAULT_LIMITS = UploadLimits()


def check_upload(path: str | Path, limits: UploadLimits = DEFAULT_LIMITS, name: str | None = None) -> Image.Image:
    """Read an uploaded file as an RGB image, refusing what the demo cannot take.

    Raises ``DemoError`` naming the file (``name``, default its file name) when it is missing, larger than
    ``limits.max_megabytes``, not a decodable image, or larger than ``limits.max_side`` px on a side.
    """
    p = Path(path)
    shown = name or p.name
    try:
        size = p.stat().st_size
    except OSError:
        raise DemoError(f"{shown}: the upload is missing (upload it again)") from None
    if size > limits.max_megabytes * 2**20:
        raise DemoError(
            f"{shown}: file is {size / 2**20:.1f} MB, more than the {limits.max_megabytes:g} MB this demo accepts"
        )
    try:
        with Image.open(p) as im:  # reads the header only: the size is checked before decoding the pixels
            width, height = im.size
            if max(width, height) <= limits.max_side:
                im.load()
                return Image.fromarray(to_rgb8(im), "RGB")  # the readers' conversion: 16 bit scaled, not clipped
    except Image.DecompressionBombError:
        raise DemoError(f"{shown}: image has too many pixels to decode safely") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        kind = "not an image" if isinstance(err, UnidentifiedImageError) else "a damaged image"
        raise DemoError(f"{shown}: {kind} (upload a PNG, JPEG, WebP, BMP or TIFF picture)") from None
    raise DemoError(
        f"{shown}: image is {width}x{height} px, larger than the {limits.max_side} px per side this demo accepts "
        "(scale it down, or start the demo with a larger --max-image-side)"
    )


def parse_prompts(text: str | None) -> list[str]:
    """``"red circle, blue square"`` -> ``["red circle", "blue square"]`` (commas, semicolons or newlines)."""
    return [t.strip() for t in re.split(r"[,;\n]", text or "") if t.strip()]


def parse_boxes(text: str | None) -> list[tuple[float, float, float, float]]:
    """Exemplar boxes, one ``x0,y0,x1,y1`` (pixels) per line or separated by ``;``."""
    boxes = []
    for part in re.split(r"[;\n]", text or ""):
        if part.strip():
            try:
                boxes.append(parse_box(part))
            except PromptError as err:
                raise DemoError(str(err)) from None
    return boxes


def add_corner(
    pending: Sequence[float] | None, boxes_text: str, x: float, y: float
) -> tuple[tuple[float, float] | None, str, str]:
    """One click on the image while drawing boxes: the first click is a corner, the second closes the box.

    Returns ``(pending corner or None, boxes text, hint)``; a finished box is appended to ``boxes_text`` as
    ``x0,y0,x1,y1`` with x0 < x1 and y0 < y1.
    """
    if pending is None:
        return (float(x), float(y)), boxes_text, f"First corner at {x:g},{y:g}: click the opposite corner."
    (px, py) = pending
    if px == x or py == y:
        return None, boxes_text, "That box has no area: click two opposite corners."
    box = f"{min(px, x):g},{min(py, y):g},{max(px, x):g},{max(py, y):g}"
    text = "\n".join(line for line in [*(boxes_text or "").splitlines(), box] if line.strip())
    return None, text, f"Added box {box}. Click again to add another."


@dataclass
class DemoResult:
    """What one press of *Segment* shows.

    Attributes:
        overlays: per model, (image (W, H) with masks, boxes and scores drawn, caption).
        rows: one dict per instance with the keys of ``ROW_HEADERS`` (box xyxy px, area in mask pixels).
        masks_zip: ``<model>/<prompt>_<k>.png`` binary masks (0/255, the image's size).
        coco_json: COCO document: ``images`` (1), ``categories`` (one per prompt), ``annotations`` (RLE masks,
            xywh boxes, scores) of every model, each with a ``model`` key.
        summary: Markdown: instances and seconds per model.
    """

    overlays: list[tuple[Image.Image, str]]
    rows: list[dict[str, Any]]
    masks_zip: Path
    coco_json: Path
    summary: str
    seconds: dict[str, float] = field(default_factory=dict)

    def table(self) -> list[list[Any]]:
        """The rows as lists in ``ROW_HEADERS`` order."""
        return [[row[h] for h in ROW_HEADERS] for row in self.rows]


def draw_result(
    image: Image.Image, results: Sequence[PromptResult], exemplars: Sequence[Sequence[float]]
) -> Image.Image:
    """``overlay`` of the results, plus the exemplar boxes (xyxy px) outlined in white."""
    out = overlay(image, results)
    draw = ImageDraw.Draw(out)
    for box in exemplars:
        draw.rectangle(tuple(box), outline=(255, 255, 255), width=2)
    return out


class DemoService:
    """The base model and every adapter of one ``Sam3LoRAPredictor``, run on the same image and prompts.

    The predictor must be loaded unmerged (``merge=False``) to compare with the base; with a merged adapter only
    that adapter is shown. ``predict`` is serialised by a lock (the adapters share one model).
    """

    def __init__(
        self, predictor: Sam3LoRAPredictor, out_root: str | Path | None = None, max_instances: int = MAX_INSTANCES
    ) -> None:
        if BASE in predictor.adapters:
            raise DemoError(f"adapter name {BASE!r} is reserved for the base model: give the adapter another name")
        self.predictor = predictor
        base = [] if predictor.merged is not None else [(BASE, None)]
        self.models: list[tuple[str, str | None]] = base + [(name, name) for name in predictor.adapters]
        self._owns_out_root = out_root is None
        self.out_root = Path(out_root or tempfile.mkdtemp(prefix="sam3lora-demo-"))
        if self._owns_out_root:  # a temporary folder of its own: removed when the process ends
            atexit.register(self.close)
        self.max_instances = max_instances
        self._lock = threading.Lock()

    def close(self) -> None:
        """Remove the output folder if this service made it (a temporary one); a given ``out_root`` is kept."""
        if self._owns_out_root:
            shutil.rmtree(self.out_root, ignore_errors=True)

    def _segment(self, image: Image.Image, texts: list[str], boxes: list[Any], threshold: float,
                 mask_threshold: float, adapter: str | None) -> list[PromptResult]:
        """The ``max_instances`` best instances scoring >= ``threshold`` per prompt (one vision pass)."""
        prompts = make_prompts(texts or None, boxes or None)
        (out,) = self.predictor.outputs([image], prompts, batch_size=1, adapter=adapter)
        results = []
        for row in out.rows:
            keep = torch.nonzero(row.scores >= threshold).flatten()
            keep = keep[row.scores[keep].argsort(descending=True, stable=True)][: self.max_instances]
            masks, xyxy, scores = self.predictor.instances(row, out.size, keep, mask_threshold)
            results.append(PromptResult(row.prompt, masks, xyxy, scores))
        return results

    def predict(
        self,
        image: ImageInput,
        prompts: str | Sequence[str] | None,
        boxes: str | Sequence[Sequence[float]] | None = None,
        threshold: float = 0.5,
        mask_threshold: float = 0.5,
        progress: Progress | None = None,
        image_name: str = "image",
    ) -> DemoResult:
        """Segment ``prompts`` (text, comma-separated, or a list) and/or exemplar ``boxes`` with every model.

        ``progress(fraction, description)`` is called before each model and before writing the files.
        """
        texts = parse_prompts(prompts) if isinstance(prompts, str) or prompts is None else list(prompts)
        box_list = parse_boxes(boxes) if isinstance(boxes, str) or boxes is None else [tuple(b) for b in boxes]
        if len(texts) > MAX_PROMPTS or len(box_list) > MAX_BOXES:
            raise DemoError(f"{len(texts)} prompt(s) and {len(box_list)} box(es): this demo takes at most "
                            f"{MAX_PROMPTS} prompts and {MAX_BOXES} boxes per request")
        prompt_list = make_prompts(texts or None, box_list or None)  # validates before any model runs
        if not (0.0 <= threshold <= 1.0 and 0.0 <= mask_threshold <= 1.0):
            raise DemoError(f"thresholds must be in [0, 1], got {threshold} and {mask_threshold}")
        picture = to_pil(image)
        for prompt in prompt_list:
            check_boxes_inside(prompt, (picture.height, picture.width), image_name)
        report = progress or (lambda fraction, text: None)
        per_model: dict[str, list[PromptResult]] = {}
        seconds: dict[str, float] = {}
        with self._lock, torch.inference_mode():
            for i, (label, adapter) in enumerate(self.models):
                report(i / (len(self.models) + 1), f"{label}: segmenting ({i + 1}/{len(self.models)})")
                start = time.perf_counter()
                per_model[label] = self._segment(picture, texts, box_list, threshold, mask_threshold, adapter)
                seconds[label] = time.perf_counter() - start
        report(len(self.models) / (len(self.models) + 1), "writing masks and COCO json")
        return self._write(picture, image_name, [p.text for p in prompt_list], box_list, per_model, seconds)

    def _new_folder(self) -> Path:
        self.out_root.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix="run-", dir=self.out_root))
        old = sorted((p for p in self.out_root.glob("run-*") if p.is_dir()), key=lambda p: p.stat().st_mtime)
        for stale in old[:-KEEP_RUNS]:
            shutil.rmtree(stale, ignore_errors=True)
        return folder

    def _write(self, image: Image.Image, name: str, prompts: list[str], exemplars: list[Any],
               per_model: dict[str, list[PromptResult]], seconds: dict[str, float]) -> DemoResult:
        folder = self._new_folder()
        overlays, rows, detections = [], [], []
        lines = ["| model | instances | seconds |", "|---|---|---|"]
        with zipfile.ZipFile(folder / "masks.zip", "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for label, results in per_model.items():
                count = sum(len(r) for r in results)
                overlays.append((draw_result(image, results, exemplars), f"{label}: {count} instance(s)"))
                lines.append(f"| {label} | {count} | {seconds[label]:.2f} |")
                for cid, result in enumerate(results, start=1):
                    detections += [{**d, "model": label} for d in detection_records(result, 1, cid)]
                    for k, (mask, box, score) in enumerate(zip(result.masks, result.boxes.tolist(),
                                                               result.scores.tolist(), strict=True)):
                        rows.append({"model": label, "prompt": result.prompt, "instance": k,
                                     "score": round(score, 4), "box x0,y0,x1,y1": ",".join(f"{v:.0f}" for v in box),
                                     "area px": int(mask.sum())})
                        png = folder / "mask.png"
                        Image.fromarray(mask.numpy().astype("uint8") * 255).save(png)
                        archive.write(png, f"{label}/{prompt_slug(result.prompt)}_{k:03d}.png")
                        png.unlink()
        meta = [{"id": 1, "file_name": name, "width": image.width, "height": image.height}]
        doc = results_document(meta, prompts, detections)
        doc["info"] = {"description": "sam3lora-demo detections; each annotation's 'model' names the model",
                       "models": list(per_model)}
        coco = write_json(folder / "predictions.json", doc)
        summary = "\n".join(lines) if rows else "\n".join(
            [*lines, "", "No instance scored above the threshold: lower it to see weaker ones."]
        )
        return DemoResult(overlays, rows, folder / "masks.zip", coco, summary, seconds)
