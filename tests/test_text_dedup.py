"""The text encoder runs once per distinct prompt of a step (``sam3.distinct_prompts``, ``sam3.sam3_rows``), also
when it carries adapters (``lora=full``): the loss and every gradient equal the per-row run's."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from test_perf import assert_same_step, batch_for, build_module, loss_and_grads

from sam3lora.data.collate import Sam3Collate
from sam3lora.data.dataset import ImageSample
from sam3lora.data.rows import Row
from sam3lora.model.tiny import offline_processor
from sam3lora.sam3 import distinct_prompts


def test_distinct_prompts_index_each_row_to_its_first_occurrence() -> None:
    texts = ["red circle", "blue square", "red circle", "red  circle", "blue square"]  # row 3: another text
    rows, index = distinct_prompts(texts)
    assert rows.tolist() == [0, 1, 3]
    assert index.tolist() == [0, 1, 0, 2, 1]
    assert [texts[r] for r in rows[index].tolist()] == texts


def test_an_adapted_text_encoder_runs_once_per_distinct_prompt_with_the_per_row_gradients() -> None:
    module = build_module("lora=full", "++lora.init=false")  # random B: the text adapters change the outputs
    assert any("text_encoder" in n for n in module.trainable_names())
    batch = batch_for(module, images=2, prompts=3)  # 6 rows drawn from 3 prompt texts
    assert batch.text_index is not None and len(batch.text_rows) < batch.num_rows
    per_row = dataclasses.replace(batch, text_rows=None, text_index=None)
    encoded: list[int] = []  # rows through the text encoder per forward
    module.base_model.text_encoder.register_forward_pre_hook(
        lambda _m, _a, kwargs: encoded.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    ref_loss, ref_grads = loss_and_grads(module, per_row)
    assert encoded == [batch.num_rows]
    loss, grads = loss_and_grads(module, batch)
    assert encoded[1:] == [len(batch.text_rows)]
    assert any("text_encoder" in n and g.abs().sum() > 0 for n, g in grads.items())
    assert_same_step(loss, grads, ref_loss, ref_grads)


def test_the_collate_numbers_the_distinct_prompts_on_the_host() -> None:
    processor = offline_processor(224, 64)
    size = 224

    def sample(image_id: int, texts: list[str]) -> ImageSample:
        rows = [Row(category_id=1, text=t, targets=np.zeros(0, dtype=np.int64), boxes=np.zeros((1, 4), np.float32),
                    box_labels=np.full(1, -10, dtype=np.int64)) for t in texts]
        return ImageSample(pixel_values=torch.zeros(3, size, size), masks=torch.zeros(0, size, size),
                           has_mask=torch.zeros(0, dtype=torch.bool), boxes=torch.zeros(0, 4), rows=rows,
                           image_id=image_id, orig_size=(size, size))

    batch = Sam3Collate(processor.tokenizer, {}, size)([sample(1, ["cat", "dog"]), sample(2, ["dog", "cat", "bird"])])
    assert batch.text_rows.tolist() == [0, 1, 4] and batch.text_index.tolist() == [0, 1, 1, 0, 2]
    assert set(batch.model_inputs()) >= {"text_rows", "text_index"}
