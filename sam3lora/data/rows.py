"""Image -> rows: the (image, prompt) pairs SAM 3 is trained on.

One text row per category present in the (transformed) image, plus negative rows for absent categories
(empty target). Training samples ``negative_ratio`` negatives per positive row, without replacement, and
keeps at most ``max_prompts_per_image`` rows (positives first); validation queries every category, as
SAM 3's official protocol. ``mode`` adds exemplar boxes (1..``max_exemplars`` of the row's own
targets, label 1) to positive rows: ``text`` none, ``box`` boxes with the text ``"visual"`` (what
``Sam3Processor`` uses for box-only prompts), ``text+box`` both. Negative rows stay text-only (their
category text, in every mode). A row without exemplars carries one padding box (label -10) so ``K >= 1``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from sam3lora.sam3 import PAD_LABEL, VISUAL_PROMPT, exemplar_boxes

PromptMode = Literal["text", "box", "text+box"]
PROMPT_MODES: tuple[str, ...] = ("text", "box", "text+box")


@dataclass(frozen=True)
class PromptSettings:
    """How rows are drawn from an image (see module docstring): the ``data.prompts`` node of the data configs
    (``conf/data/_common.yaml``), the one place its values are stated; in Python, e.g.
    ``sam3lora.config.defaults("data/coco.prompts", mode="box")``.

    ``mode``: ``text | box | text+box``. ``negative_ratio``: expected negatives per positive row in training (an
    image without positives counts as one); ``None`` queries every absent category. ``max_prompts_per_image``:
    training cap, None = no cap. ``max_exemplars``: box modes draw 1..max_exemplars exemplar boxes per positive row.
    """

    mode: PromptMode
    negative_ratio: float | None
    max_prompts_per_image: int | None
    max_exemplars: int

    def __post_init__(self) -> None:
        key = PROMPTS_KEY
        if self.mode not in PROMPT_MODES:
            raise ValueError(f"{key}.mode must be one of {PROMPT_MODES}, got {self.mode!r}")
        if self.negative_ratio is not None and not self.negative_ratio >= 0:
            raise ValueError(f"{key}.negative_ratio must be >= 0 or null (all absent categories), got "
                             f"{self.negative_ratio}")
        if self.max_prompts_per_image is not None and self.max_prompts_per_image < 1:
            raise ValueError(f"{key}.max_prompts_per_image must be >= 1 or null, got {self.max_prompts_per_image}")
        if self.max_exemplars < 1:
            raise ValueError(f"{key}.max_exemplars must be >= 1, got {self.max_exemplars}")


PROMPTS_KEY = "data.prompts"
"""Where :class:`PromptSettings` is stated in the composed config (its errors name ``data.prompts.<field>``)."""


@dataclass
class Row:
    """One (image, prompt) pair.

    ``targets``: long (n,) indices into the image's instances (n == 0: negative prompt).
    ``boxes``: float32 (K, 4) exemplar boxes, normalised cxcywh; ``box_labels``: int64 (K,), 1 or -10 (pad).
    """

    category_id: int
    text: str
    targets: np.ndarray
    boxes: np.ndarray
    box_labels: np.ndarray

    @property
    def is_negative(self) -> bool:
        return len(self.targets) == 0


def _padding_box() -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((1, 4), np.float32), np.full((1,), PAD_LABEL, np.int64)


def _exemplars(
    boxes_xyxy: np.ndarray, targets: np.ndarray, max_exemplars: int, rng: np.random.Generator, train: bool
) -> tuple[np.ndarray, np.ndarray]:
    """1..max_exemplars of the row's target boxes as normalised cxcywh (random in training, first k in val)."""
    k_max = min(max_exemplars, len(targets))
    if train:
        k = int(rng.integers(1, k_max + 1))
        chosen = rng.choice(targets, size=k, replace=False)
    else:
        chosen = targets[:k_max]
    cxcywh = exemplar_boxes(torch.from_numpy(boxes_xyxy[chosen].astype(np.float32))).numpy()
    return cxcywh, np.ones(len(chosen), np.int64)


def _negative_count(n_positive: int, n_absent: int, ratio: float | None, rng: np.random.Generator) -> int:
    """Stochastic rounding of ``ratio * max(n_positive, 1)`` (expected value exact), capped at ``n_absent``."""
    if ratio is None:
        return n_absent
    expected = ratio * max(n_positive, 1)
    count = int(np.floor(expected)) + int(rng.random() < expected - np.floor(expected))
    return min(count, n_absent)


def build_rows(
    instance_categories: np.ndarray,
    instance_boxes: np.ndarray,
    prompts: Mapping[int, Sequence[str]],
    settings: PromptSettings,
    rng: np.random.Generator,
    train: bool,
) -> list[Row]:
    """Rows of one image, positives first (ordered by category id within each group).

    Args:
        instance_categories: long (n,) category id of each instance (after transforms).
        instance_boxes: float (n, 4) normalised xyxy boxes of the instances.
        prompts: every category of the dataset -> its phrasings (training picks one at random, val the first).
        settings: prompt mode, negatives, cap, exemplars.
        rng: randomness of this sample (phrasings, negatives, exemplars, cap).
        train: training sampling; otherwise every category is queried, deterministically.

    Every image yields at least one row (one negative when nothing is present and none was drawn).
    """
    cats = np.asarray(instance_categories, dtype=np.int64)
    unknown = set(cats.tolist()) - set(prompts)
    if unknown:
        raise ValueError(f"instances name categories {sorted(unknown)} that have no prompt")
    present = sorted(set(cats.tolist()))
    absent = [c for c in prompts if c not in set(present)]

    if train:
        positives = list(present)
        if settings.max_prompts_per_image is not None and len(positives) > settings.max_prompts_per_image:
            positives = sorted(rng.choice(positives, size=settings.max_prompts_per_image, replace=False).tolist())
        n_neg = _negative_count(len(positives), len(absent), settings.negative_ratio, rng)
        if settings.max_prompts_per_image is not None:
            n_neg = min(n_neg, settings.max_prompts_per_image - len(positives))
        if not positives and n_neg == 0 and absent:
            n_neg = 1
        negatives = sorted(rng.choice(absent, size=n_neg, replace=False).tolist()) if n_neg else []
    else:
        positives, negatives = present, absent

    rows: list[Row] = []
    for cid in positives + negatives:
        phrasings = prompts[cid]
        text = phrasings[int(rng.integers(len(phrasings)))] if train and len(phrasings) > 1 else phrasings[0]
        targets = np.flatnonzero(cats == cid).astype(np.int64)
        if len(targets) and settings.mode != "text":
            boxes, labels = _exemplars(instance_boxes, targets, settings.max_exemplars, rng, train)
            if settings.mode == "box":
                text = VISUAL_PROMPT
        else:
            boxes, labels = _padding_box()
        rows.append(Row(category_id=int(cid), text=text, targets=targets, boxes=boxes, box_labels=labels))
    return rows
