"""The collated training batch (``docs/contracts.md``): rows grouped by image."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class Sam3Batch:
    """One batch of I images and R (image, prompt) rows; the rows of one image are contiguous.

    ==================  ======================  ===========================================================
    field               shape / type            meaning
    ==================  ======================  ===========================================================
    pixel_values        float (I, 3, S, S)      normalised with the processor's mean/std
    image_index         long (R,)               row -> index into ``pixel_values``
    input_ids           long (R, 32)            tokenized prompt text (processor tokenizer, padded to 32)
    attention_mask      long (R, 32)            its attention mask
    input_boxes         float (R, K, 4)         exemplar boxes, normalised cxcywh; K >= 1 always
    input_boxes_labels  long (R, K)             1 positive, 0 negative, -10 padding
    targets             list[dict] (R)          ``boxes`` float (n, 4) normalised xyxy; ``masks`` bool
                                                (n, S, S); ``has_mask`` bool (n,); n == 0: negative row
    prompts             list[str] (R)           prompt text
    category_ids        long (R,)               COCO category id of each row
    image_ids           long (I,)               COCO image id
    orig_sizes          long (I, 2)             original (height, width)
    text_rows           long (U,) or None       first row of each distinct prompt text: the text
                                                encoder runs on these U rows only (``sam3.distinct_prompts``)
    text_index          long (R,) or None       row -> its entry of ``text_rows``; None (both): once per row
    ==================  ======================  ===========================================================

    Lightning moves the tensors (targets included) to the device; ``pin_memory`` serves the DataLoader.
    The model takes ``pixel_values[image_index]`` or, cheaper, the vision features of ``pixel_values``
    expanded by ``image_index``.
    """

    pixel_values: torch.Tensor
    image_index: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    input_boxes: torch.Tensor
    input_boxes_labels: torch.Tensor
    targets: list[dict[str, torch.Tensor]]
    prompts: list[str]
    category_ids: torch.Tensor
    image_ids: torch.Tensor
    orig_sizes: torch.Tensor
    text_rows: torch.Tensor | None = None
    text_index: torch.Tensor | None = None

    @property
    def num_images(self) -> int:
        return int(self.pixel_values.shape[0])

    @property
    def num_rows(self) -> int:
        return int(self.image_index.shape[0])

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """The tensors ``Sam3Model`` takes, keyed as ``sam3lora.sam3.sam3_inputs`` (``sam3_rows`` runs them)."""
        names = ("pixel_values", "image_index", "input_ids", "attention_mask", "input_boxes", "input_boxes_labels",
                 "text_rows", "text_index")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

    def rows_of_image(self, i: int) -> torch.Tensor:
        """Long (r,) indices of the rows of image ``i``."""
        return torch.nonzero(self.image_index == i).flatten()

    def pin_memory(self) -> Sam3Batch:
        """Copy with every tensor in pinned memory (called by ``DataLoader(pin_memory=True)``)."""
        values = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                v = v.pin_memory()
            elif f.name == "targets":
                v = [{k: t.pin_memory() for k, t in d.items()} for d in v]
            values[f.name] = v
        return Sam3Batch(**values)
