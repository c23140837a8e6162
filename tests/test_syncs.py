"""Host-device synchronisations of a training step, counted on the CPU (``sam3lora.perf.syncs.SyncCounter``).

Before issue #14 a step of the tiny model (2 images x 3 prompts, 3 decoder layers, DAC on) made 56 synchronising
calls: a ``.cpu()`` per matched layer and per mask bookkeeping, 12 ``.item()`` in the DETR decoder's coordinate
grid, ``bool()``/``int()`` reads in the mask terms, 7 ``padding_mask.all()`` in transformers' attention-mask
builders. Now the criterion makes one copy for all of it, the decoder none and the masks are built without a read
(``sam3lora.model.materialised_masks``).
"""

from __future__ import annotations

import dataclasses

import torch
from test_perf import batch_for, build_module, loss_and_grads

from sam3lora.inference.model_with_adapters import load_for_inference
from sam3lora.loss.matcher import HungarianMatcher, OneToManyMatcher, match_layers
from sam3lora.model import load_model
from sam3lora.model.materialised_masks import MASKED_COMPONENTS, MATERIALISED, materialise_attention_masks
from sam3lora.perf.random_inputs import synthetic_batch
from sam3lora.perf.syncs import SyncCounter
from sam3lora.sam3 import sam3_rows

STEP_LIMIT = 1  # the criterion's one copy (sam3lora.loss.matcher.match_layers)


def test_the_counter_sees_each_kind_of_synchronisation() -> None:
    x = torch.tensor([0.0, 2.0, 0.0])
    with SyncCounter() as counter:
        x.sum().item()
        bool(x.any())
        x.nonzero()
        x[x > 0]  # boolean-mask indexing: a data-dependent size
        x.cpu()
        x.tolist()
        x + 1  # not a synchronisation
    assert counter.by_op["_local_scalar_dense"] == 2
    assert counter.by_op["nonzero"] == 2
    assert counter.by_op["cpu"] == 1 and counter.by_op["tolist"] == 1
    assert counter.total == 6


def test_a_training_step_synchronises_once_in_our_code() -> None:
    module = build_module("lora=balanced")
    batch = batch_for(module)
    loss_and_grads(module, batch)  # first step: lazy initialisation out of the count
    with SyncCounter() as counter:
        loss, _ = loss_and_grads(module, batch)
    assert torch.isfinite(loss)
    assert len(counter.by_site) == 1 and next(iter(counter.by_site)).startswith("cpu "), counter.by_site
    assert counter.total == STEP_LIMIT, counter.by_site


def test_materialised_masks_read_nothing_and_leave_the_outputs_bitwise_equal() -> None:
    model, _ = load_model("tiny", dtype="float32", seed=0)
    text = model.config.text_config
    batch = synthetic_batch(2, 3, model.config.image_size, text.vocab_size, distinct_prompts=3,
                            bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id)
    rows = batch.num_rows
    boxed = dataclasses.replace(  # one valid exemplar box per row: the geometry prompts pad nothing
        batch, input_boxes=torch.tensor([0.5, 0.5, 0.3, 0.3]).repeat(rows, 1, 1),
        input_boxes_labels=torch.ones(rows, 1, dtype=torch.long),
    )

    def outputs(b: object) -> tuple[list[torch.Tensor], int]:
        with torch.no_grad(), SyncCounter() as counter:
            out = sam3_rows(model, b.model_inputs())
        reads = sum(n for site, n in counter.by_site.items() if "masking_utils.py" in site)
        return [out.pred_logits, out.pred_boxes, out.presence_logits, out.pred_masks, out.semantic_seg], reads

    before = [outputs(b) for b in (batch, boxed)]
    assert materialise_attention_masks(model) == list(MASKED_COMPONENTS)
    after = [outputs(b) for b in (batch, boxed)]
    assert [reads for _, reads in before] == [6, 6]  # CLIP's causal mask 2, 4 bidirectional masks 1 each
    assert [reads for _, reads in after] == [0, 0]
    for (ref, _), (got, _) in zip(before, after, strict=True):  # the unpadded geometry mask: bitwise on the CPU
        for r, g in zip(ref, got, strict=True):
            assert torch.equal(r, g)


def test_one_copy_for_all_layers_gives_each_matchers_own_result() -> None:
    gen = torch.Generator().manual_seed(0)
    rows, queries = 4, 12
    targets = [{"boxes": _boxes(n, gen)} for n in (2, 0, 3, 1)]
    hungarian = HungarianMatcher(cost_bbox=5.0, cost_class=2.0, cost_giou=2.0, focal_alpha=0.25, focal_gamma=2.0)
    o2m = OneToManyMatcher(alpha=0.3, threshold=0.1, topk=4)
    layers = [
        (matcher, torch.randn(rows, queries, generator=gen), _boxes(rows * queries, gen).view(rows, queries, 4))
        for matcher in (hungarian, hungarian, o2m)
    ]
    flags = torch.tensor([True, False, True])
    with SyncCounter() as counter:
        *together, host_flags = match_layers(layers, targets, [flags])
    assert counter.total == 1
    assert host_flags.tolist() == [1.0, 0.0, 1.0]
    assert sum(len(q) for q, _ in together[2]) > 0  # the one-to-many layer matched something
    for (matcher, logits, boxes), got in zip(layers, together, strict=True):
        alone = matcher(logits, boxes, targets)
        for (q, t), (q_ref, t_ref) in zip(got, alone, strict=True):
            assert torch.equal(q, q_ref) and torch.equal(t, t_ref)


def _boxes(n: int, gen: torch.Generator) -> torch.Tensor:
    """(n, 4) valid normalised xyxy boxes."""
    xy = torch.rand(n, 2, generator=gen) * 0.6
    return torch.cat([xy, xy + 0.05 + torch.rand(n, 2, generator=gen) * 0.3], dim=1)


def test_prediction_builds_its_attention_masks_without_host_reads() -> None:
    """``load_for_inference`` (every predictor, the demo, evaluation) moves the masked components as training does."""
    loaded = load_for_inference("tiny", dtype="float32", seed=0)
    base = loaded.model
    for name in MASKED_COMPONENTS:
        configs = [m.config for m in base.get_submodule(name).modules() if getattr(m, "config", None) is not None]
        assert configs and all(c._attn_implementation == MATERIALISED for c in configs), name

