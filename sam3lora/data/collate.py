"""The collate: ``list[ImageSample | None] -> Sam3Batch``, rows grouped by image, prompts tokenised once."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from sam3lora.data.batch import Sam3Batch
from sam3lora.data.dataset import BadSampleFailure, ImageSample
from sam3lora.sam3 import PAD_LABEL, TEXT_LENGTH, distinct_prompts, tokenize


class Sam3Collate:
    """``list[ImageSample | None] -> Sam3Batch``: rows grouped by image (None items are dropped; with no
    item left the batch has I = R = 0).

    Known prompts are looked up in ``cache`` (``{text: (ids (32,), mask (32,))}``, built once in the main
    process); others are tokenized with ``tokenizer``.
    """

    def __init__(
        self, tokenizer: Any, cache: Mapping[str, tuple[torch.Tensor, torch.Tensor]], image_size: int
    ) -> None:
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.cache = dict(cache)

    def _tokens(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        missing = sorted({t for t in texts if t not in self.cache})
        if missing:
            ids, mask = tokenize(self.tokenizer, missing)
            self.cache.update({t: (ids[i], mask[i]) for i, t in enumerate(missing)})
        if not texts:
            return torch.zeros(0, TEXT_LENGTH, dtype=torch.long), torch.zeros(0, TEXT_LENGTH, dtype=torch.long)
        return torch.stack([self.cache[t][0] for t in texts]), torch.stack([self.cache[t][1] for t in texts])

    def __call__(self, samples: Sequence[ImageSample | BadSampleFailure | None]) -> Sam3Batch | BadSampleFailure:
        failed = next((s for s in samples if isinstance(s, BadSampleFailure)), None)
        if failed is not None:
            return failed
        samples = [s for s in samples if s is not None]
        rows = [(i, row) for i, s in enumerate(samples) for row in s.rows]
        k = max((len(row.box_labels) for _, row in rows), default=1)
        boxes = torch.zeros(len(rows), k, 4, dtype=torch.float32)
        labels = torch.full((len(rows), k), PAD_LABEL, dtype=torch.long)
        targets: list[dict[str, torch.Tensor]] = []
        for r, (i, row) in enumerate(rows):
            n = len(row.box_labels)
            boxes[r, :n] = torch.from_numpy(row.boxes)
            labels[r, :n] = torch.from_numpy(row.box_labels)
            idx = torch.from_numpy(row.targets)
            s = samples[i]
            targets.append({"boxes": s.boxes[idx], "masks": s.masks[idx], "has_mask": s.has_mask[idx]})
        prompts = [row.text for _, row in rows]
        input_ids, attention_mask = self._tokens(prompts)
        text_rows, text_index = distinct_prompts(prompts)  # on the host: no device read later
        size = self.image_size
        return Sam3Batch(
            pixel_values=torch.stack([s.pixel_values for s in samples]) if samples else torch.zeros(0, 3, size, size),
            image_index=torch.tensor([i for i, _ in rows], dtype=torch.long),
            input_ids=input_ids,
            attention_mask=attention_mask,
            input_boxes=boxes,
            input_boxes_labels=labels,
            targets=targets,
            prompts=prompts,
            category_ids=torch.tensor([row.category_id for _, row in rows], dtype=torch.long),
            image_ids=torch.tensor([s.image_id for s in samples], dtype=torch.long),
            orig_sizes=torch.tensor([s.orig_size for s in samples], dtype=torch.long).reshape(-1, 2),
            text_rows=text_rows,
            text_index=text_index,
        )

