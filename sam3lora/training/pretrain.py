"""Full pretraining of a small SAM 3 on cached synthetic tensors, resumable across sessions.

``scripts/pretrain_tiny.py`` makes the ``tiny-pretrained`` base with this module. Three parts:

* :class:`TensorSet`: synthetic images rendered **once** (:func:`sam3lora.data.synthetic_shapes.render_image`, the same
  generator as the PNG sets) into one uint8 tensor file: images ``(N,3,S,S)``, an instance label map ``(N,S,S)``
  (visible masks never overlap, so one map holds them all; 0 is background, k the k-th instance) and the
  category id of every instance ``(N,M)``. The file is keyed by the generator settings and reused by every run
  (:func:`load_or_render`); it is moved to the training device once, so on a GPU data and augmentation never
  leave it.
* :func:`make_batch`: augmentation on tensors (random square rescale with a random position, as the datamodule's
  ``random_square``, a horizontal flip, brightness/contrast/saturation jitter), boxes from the augmented label
  map, prompt rows (every category present plus ``negative_ratio`` sampled absent ones) and the
  :class:`~sam3lora.data.batch.Sam3Batch` the rest of the project uses. Randomness comes from a generator seeded by
  ``(seed, step)`` only, so a step is the same whether a run was interrupted or not.
* :class:`Pretrainer`: a lean loop (no Lightning) around :class:`~sam3lora.training.module.Sam3LoRAModule`'s own
  forward and the configured criterion, AdamW + the project's schedule + gradient clipping, validation with the
  module's own metric code, and a whole-or-nothing state file (weights, optimiser, step, RNG, best; the schedule
  follows from the step) that a later session resumes exactly.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from sam3lora.data.batch import Sam3Batch
from sam3lora.data.synthetic_shapes import MAX_OBJECTS, parse_categories, render_image
from sam3lora.io import atomic_file
from sam3lora.sam3 import distinct_prompts, tokenize
from sam3lora.training.module import Sam3LoRAModule
from sam3lora.training.schedule import ScheduleSettings

CACHE_VERSION = 1  # bump when the rendering or the file layout changes: old caches are then rendered anew
STATE_VERSION = 1


# ------------------------------------------------------------------------------------------------ the cache


@dataclass(frozen=True)
class RenderSettings:
    """What a cached set is a function of (its key). ``split`` picks the generator's per-split seeds."""

    count: int
    size: int
    seed: int
    categories: tuple[str, ...]
    split: str = "train"
    hard_negatives: float = 0.0

    def key(self) -> str:
        text = json.dumps({"version": CACHE_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class TensorSet:
    """Rendered images with their instances, as tensors (see the module docstring)."""

    images: Tensor  # uint8 (N,3,S,S)
    labels: Tensor  # uint8 (N,S,S): 0 background, k = instance k-1
    instance_categories: Tensor  # long (N,M): category id (1-based) of instance k, 0 for none
    categories: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def size(self) -> int:
        return int(self.images.shape[-1])

    def to(self, device: torch.device | str) -> TensorSet:
        return TensorSet(self.images.to(device), self.labels.to(device), self.instance_categories.to(device),
                         self.categories)


def _render_range(settings: RenderSettings, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images ``start .. stop - 1`` as numpy arrays: uint8 (n,3,S,S), uint8 labels (n,S,S), int64 (n,M)."""
    cats = parse_categories(settings.categories)
    n, s = stop - start, settings.size
    images = np.zeros((n, 3, s, s), np.uint8)
    labels = np.zeros((n, s, s), np.uint8)
    instance_categories = np.zeros((n, MAX_OBJECTS), np.int64)
    for i, index in enumerate(range(start, stop)):
        image, instances = render_image(cats, s, settings.seed, settings.split, index, settings.hard_negatives)
        images[i] = image.transpose(2, 0, 1)
        for k, (category_id, mask) in enumerate(instances):
            labels[i][mask] = k + 1
            instance_categories[i, k] = category_id
    return images, labels, instance_categories


def _context() -> multiprocessing.context.BaseContext:
    """``fork`` where there is one (workers start in milliseconds; they only run numpy and OpenCV), else ``spawn``."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def render_set(settings: RenderSettings, workers: int | None = None) -> TensorSet:
    """Render ``settings.count`` images with the synthetic generator (identical pixels to ``write_synthetic``), in
    ``workers`` processes (default: the CPUs this process may use, at most 32); the result does not depend on it."""
    cats = parse_categories(settings.categories)
    if workers is None:
        workers = min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1, 32)
    chunk = max(64, -(-settings.count // max(workers * 4, 1)))
    bounds = [(a, min(a + chunk, settings.count)) for a in range(0, settings.count, chunk)]
    if workers <= 1 or len(bounds) <= 1:
        parts = [_render_range(settings, a, b) for a, b in bounds]
    else:
        with ProcessPoolExecutor(workers, mp_context=_context()) as pool:
            parts = list(pool.map(_render_range, [settings] * len(bounds), *zip(*bounds, strict=True)))
    images, labels, instance_categories = (torch.from_numpy(np.concatenate([p[i] for p in parts]))
                                           for i in range(3))
    return TensorSet(images, labels, instance_categories, tuple(c.name for c in cats))


def load_or_render(settings: RenderSettings, cache_dir: Path, log: Callable[[str], None] = print) -> TensorSet:
    """The set for ``settings`` from ``cache_dir`` (rendered and written there, whole or not at all, when absent)."""
    path = Path(cache_dir) / f"synthetic-{settings.split}-{settings.count}x{settings.size}-{settings.key()}.pt"
    if path.is_file():
        data = torch.load(path, map_location="cpu", weights_only=True)
        return TensorSet(data["images"], data["labels"], data["instance_categories"], tuple(data["categories"]))
    started = time.perf_counter()
    data_set = render_set(settings)
    with atomic_file(path) as tmp:
        torch.save({"images": data_set.images, "labels": data_set.labels,
                    "instance_categories": data_set.instance_categories, "categories": list(data_set.categories),
                    "settings": asdict(settings), "version": CACHE_VERSION}, tmp)
    log(f"rendered {settings.count} {settings.split} images in {time.perf_counter() - started:.1f} s -> {path}")
    return data_set


# ------------------------------------------------------------------------------------------------ batches


@dataclass(frozen=True)
class AugmentSettings:
    """Tensor augmentation of training batches (validation is never augmented).

    ``scale_range``: the image is resized to ``s x s`` with ``s / S`` uniform in this range and placed at a random
    position on a black ``S x S`` canvas (the datamodule's ``random_square``, continuous sizes). ``flip``: horizontal
    flip probability. ``jitter``: probability of brightness/contrast/saturation jitter of +-``jitter_strength``
    (no hue jitter: colours are the categories' words).
    """

    scale_range: tuple[float, float] = (0.5, 1.0)
    flip: float = 0.5
    jitter: float = 0.5
    jitter_strength: float = 0.2


def _augment(images: Tensor, labels: Tensor, settings: AugmentSettings, gen: torch.Generator,
             ) -> tuple[Tensor, Tensor]:
    """float (B,3,S,S) in [0,1] and uint8 labels (B,S,S) -> augmented images and labels (same shapes)."""
    b, device = images.shape[0], images.device

    def rand(*shape: int) -> Tensor:
        return torch.rand(*shape, generator=gen, device=device)

    lo, hi = settings.scale_range
    scale = lo + (hi - lo) * rand(b)
    # position of the resized image in normalised output coordinates: its centre in [-1 + s, 1 - s]
    centre = (rand(b, 2) * 2 - 1) * (1 - scale[:, None])
    flip = torch.where(rand(b) < settings.flip, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3, device=device)
    theta[:, 0, 0] = flip / scale
    theta[:, 0, 2] = -flip * centre[:, 0] / scale
    theta[:, 1, 1] = 1 / scale
    theta[:, 1, 2] = -centre[:, 1] / scale
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    lab = F.grid_sample(labels[:, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    if settings.jitter > 0:
        on = (rand(b) < settings.jitter).float()[:, None, None, None]
        strength = settings.jitter_strength
        bright, contrast, saturation = (1 + on * strength * (rand(b, 1, 1, 1) * 2 - 1) for _ in range(3))
        out = out * bright
        grey = (0.299 * out[:, 0:1] + 0.587 * out[:, 1:2] + 0.114 * out[:, 2:3])
        out = (out - grey.mean((2, 3), keepdim=True)) * contrast + grey.mean((2, 3), keepdim=True)
        grey = (0.299 * out[:, 0:1] + 0.587 * out[:, 1:2] + 0.114 * out[:, 2:3])
        out = (grey + (out - grey) * saturation).clamp(0, 1)
    return out, lab[:, 0].round().to(torch.uint8)


def _boxes_from_masks(masks: Tensor) -> tuple[Tensor, Tensor]:
    """bool (B,M,S,S) -> normalised xyxy boxes (B,M,4) (COCO convention: x1 = last column + 1) and valid (B,M)."""
    s = masks.shape[-1]
    rows, cols = masks.any(-1), masks.any(-2)  # (B,M,S)
    valid = rows.any(-1)
    ar = torch.arange(s, device=masks.device)
    big = torch.full_like(ar, s)
    y0 = torch.where(rows, ar, big).amin(-1)
    y1 = torch.where(rows, ar, -1).amax(-1) + 1
    x0 = torch.where(cols, ar, big).amin(-1)
    x1 = torch.where(cols, ar, -1).amax(-1) + 1
    boxes = torch.stack([x0, y0, x1, y1], -1).float() / s
    return torch.where(valid[..., None], boxes, torch.zeros_like(boxes)), valid


@dataclass
class BatchMaker:
    """Turns image indices of a :class:`TensorSet` (on the training device) into a :class:`Sam3Batch`.

    ``negative_ratio``: expected absent-category rows per positive row in training (None: every category, as
    validation); ``max_prompts``: cap on rows per image (positives first).
    """

    data: TensorSet
    input_ids: Tensor  # (C,32) per category, on the device
    attention_mask: Tensor
    mean: Tensor  # (3,1,1)
    std: Tensor
    augment: AugmentSettings | None = None
    negative_ratio: float | None = 1.0
    max_prompts: int = 8

    @classmethod
    def build(cls, data: TensorSet, tokenizer: Any, mean: Sequence[float], std: Sequence[float],
              **kwargs: Any) -> BatchMaker:
        ids, mask = tokenize(tokenizer, list(data.categories))
        device = data.images.device
        as_t = lambda v: torch.tensor(list(v), dtype=torch.float32, device=device).view(3, 1, 1)  # noqa: E731
        return cls(data, ids.to(device), mask.to(device), as_t(mean), as_t(std), **kwargs)

    def __call__(self, index: Tensor, gen: torch.Generator | None = None) -> Sam3Batch:
        data, device = self.data, self.data.images.device
        index = index.to(device)
        images = data.images[index].float() / 255
        labels = data.labels[index]
        if self.augment is not None:
            if gen is None:
                raise ValueError("augmentation needs a generator")
            images, labels = _augment(images, labels, self.augment, gen)
        pixel_values = (images - self.mean) / self.std
        m = data.instance_categories.shape[1]
        slots = torch.arange(1, m + 1, device=device, dtype=torch.uint8)
        masks = labels[:, None] == slots[None, :, None, None]  # (B,M,S,S)
        boxes, valid = _boxes_from_masks(masks)
        inst_cat = torch.where(valid, data.instance_categories[index], 0)  # (B,M)
        n_cat = len(data.categories)
        cat_ids = torch.arange(1, n_cat + 1, device=device)
        present = (inst_cat[:, :, None] == cat_ids[None, None]).any(1)  # (B,C)
        selected = self._select_rows(present, gen)
        image_index, row_cat = torch.nonzero(selected, as_tuple=True)  # rows grouped by image, by category
        row_cat = row_cat + 1
        match = (inst_cat[image_index] == row_cat[:, None])  # (R,M)
        r_idx, k_idx = torch.nonzero(match, as_tuple=True)
        flat = image_index[r_idx] * m + k_idx
        all_boxes = boxes.reshape(-1, 4)[flat]
        all_masks = masks.reshape(-1, *masks.shape[2:])[flat]
        counts = match.sum(1).tolist()  # the one host sync of a batch
        targets = [
            {"boxes": b, "masks": k, "has_mask": torch.ones(len(b), dtype=torch.bool, device=device)}
            for b, k in zip(all_boxes.split(counts), all_masks.split(counts), strict=True)
        ]
        r = len(counts)
        row_cat_cpu = row_cat.tolist()
        prompts = [data.categories[c - 1] for c in row_cat_cpu]
        text_rows, text_index = distinct_prompts(prompts)  # one prompt per category: encoded once per batch
        return Sam3Batch(
            pixel_values=pixel_values,
            image_index=image_index,
            input_ids=self.input_ids[row_cat - 1],
            attention_mask=self.attention_mask[row_cat - 1],
            input_boxes=torch.zeros(r, 1, 4, device=device),
            input_boxes_labels=torch.full((r, 1), -10, dtype=torch.long, device=device),
            targets=targets,
            prompts=prompts,
            category_ids=row_cat,
            image_ids=index + 1,
            orig_sizes=torch.full((len(index), 2), data.size, dtype=torch.long, device=device),
            text_rows=text_rows.to(device),
            text_index=text_index.to(device),
        )

    def _select_rows(self, present: Tensor, gen: torch.Generator | None) -> Tensor:
        """bool (B,C): the rows of each image: its categories present plus sampled absent ones (all of them with
        ``negative_ratio`` None), at most ``max_prompts`` (positives first); at least one row per image."""
        if self.negative_ratio is None:
            return torch.ones_like(present)
        if gen is None:
            raise ValueError("sampling negatives needs a generator")
        b, c = present.shape
        device = present.device
        n_pos = present.sum(1)
        expected = self.negative_ratio * n_pos.clamp(min=1).float()
        n_neg = expected.floor() + (torch.rand(b, generator=gen, device=device) < expected - expected.floor()).float()
        n_neg = torch.minimum(n_neg, (self.max_prompts - n_pos).clamp(min=0).float())
        n_neg = torch.where((n_pos == 0) & (n_neg == 0), 1.0, n_neg)
        # rank absent categories in a random order; positives first (rank -1), then keep ranks < n_neg
        noise = torch.rand(b, c, generator=gen, device=device)
        position = torch.where(present, -1.0, noise).argsort(1).argsort(1)  # positives take 0 .. n_pos - 1
        keep_pos = present & (position < self.max_prompts)
        rank = position - n_pos[:, None]  # 0 .. among the absent ones
        return keep_pos | (~present & (rank < n_neg[:, None]))


# ------------------------------------------------------------------------------------------------ training


@torch.no_grad()
def spread_reference_boxes(model: torch.nn.Module, seed: int, size: float = 0.2) -> Tensor:
    """Spread the DETR decoder's learned reference boxes over the image before training from scratch.

    transformers initialises ``detr_decoder.reference_points`` (Q,4) near 0, so every query starts at the same box
    (cx, cy, w, h) ~ (0.5, 0.5, 0.5, 0.5) and the box-relative attention bias gives all of them the same view: in
    pretraining they barely move and the queries fail to tell apart several instances of one category (issue #12,
    docs/training.md). This sets centres uniform in [0.05, 0.95] (drawn from ``seed``) and ``w = h = size``, as
    DAB-DETR's random anchors. Returns the boxes (Q,4) cxcywh in [0,1]; the weights hold their logits.
    """
    weight = model.get_submodule("detr_decoder.reference_points").weight  # (Q,4) logits of cxcywh
    gen = torch.Generator().manual_seed(seed)
    centres = 0.05 + 0.9 * torch.rand(weight.shape[0], 2, generator=gen)
    boxes = torch.cat([centres, torch.full_like(centres, size)], 1)
    weight.copy_(torch.logit(boxes).to(weight))
    return boxes



@dataclass
class PretrainSettings:
    """The whole run: fixed when its state is created (a resumed run keeps them; see :meth:`Pretrainer.resume`).

    ``steps``: optimiser steps of the whole pretraining (the cosine schedule spans them); ``warm_steps``: first
    steps without negative prompts and without the presence loss (grounding before presence).
    """

    steps: int
    warm_steps: int
    batch_size: int
    lr: float
    weight_decay: float = 0.05
    warmup_steps: int = 100
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0
    negative_ratio: float = 1.0
    max_prompts: int = 8
    seed: int = 0
    bf16: bool = False  # autocast the forward and the loss to bfloat16 (GPUs)
    augment: AugmentSettings = field(default_factory=AugmentSettings)


def _step_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(int(np.random.SeedSequence([seed, step]).generate_state(1)[0]))
    return gen


class Pretrainer:
    """Train every weight of ``module.model`` on a :class:`TensorSet`, step by step, resumably.

    The forward is :class:`Sam3LoRAModule`'s (vision encoder once per image, aux and DAC outputs); the loss is its
    criterion. Data order: epoch ``e`` is a permutation of the images drawn from ``(seed, e)``; step ``t`` takes
    batch ``t mod (N // batch_size)`` of epoch ``t // (N // batch_size)``.
    """

    def __init__(self, module: Sam3LoRAModule, train: TensorSet, settings: PretrainSettings, tokenizer: Any,
                 mean: Sequence[float], std: Sequence[float], device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.settings = settings
        self.module = module.to(self.device)
        self.train_data = train.to(self.device)
        self.tokenizer, self.mean, self.std = tokenizer, mean, std
        if len(train) < settings.batch_size:
            raise ValueError(f"{len(train)} training images for batch size {settings.batch_size}")
        self.maker = BatchMaker.build(self.train_data, tokenizer, mean, std, augment=settings.augment,
                                      negative_ratio=settings.negative_ratio, max_prompts=settings.max_prompts)
        self.presence_weight = module.criterion.weight_dict["loss_presence"]
        self.optimizer = torch.optim.AdamW(module.param_groups(), lr=settings.lr,
                                           weight_decay=settings.weight_decay, foreach=True)
        self.schedule = ScheduleSettings("cosine", settings.warmup_steps, settings.min_lr_ratio)
        self.scheduler = self.schedule.build(self.optimizer, settings.steps)
        self.step = 0
        self.images_seen = 0
        self.seconds = 0.0
        self.best: dict[str, Any] = {}
        self.history: list[dict[str, Any]] = []
        self.meta: dict[str, Any] = {}  # the caller's record (data, overrides, sessions), saved with the state
        self._perm: tuple[int, Tensor] | None = None

    @property
    def steps_per_epoch(self) -> int:
        return len(self.train_data) // self.settings.batch_size

    def _indices(self, step: int) -> Tensor:
        epoch, position = divmod(step, self.steps_per_epoch)
        if self._perm is None or self._perm[0] != epoch:
            gen = torch.Generator().manual_seed(int(np.random.SeedSequence([self.settings.seed, epoch, 1])
                                                    .generate_state(1)[0]))
            self._perm = (epoch, torch.randperm(len(self.train_data), generator=gen))
        b = self.settings.batch_size
        return self._perm[1][position * b:(position + 1) * b]

    def train_step(self) -> dict[str, float]:
        """One optimiser step (the curriculum stage follows from the step); returns the detached loss terms."""
        s, step = self.settings, self.step
        warm = step < s.warm_steps
        self.maker.negative_ratio = 0.0 if warm else s.negative_ratio
        criterion = self.module.criterion
        criterion.weight_dict["loss_presence"] = 0.0 if warm else self.presence_weight
        gen = _step_generator(s.seed, step, self.device)
        batch = self.maker(self._indices(step), gen)
        self.module.train()
        # the model's own randomness (dropout) and the loss's (point sampling) from (seed, step) too, so that a
        # step does not depend on what ran before it in this process
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, device_type=self.device.type):
            torch.manual_seed(int(torch.randint(2**62, (1,), generator=gen, device=self.device)))
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=s.bf16):
                outputs = self.module(batch)
                losses = criterion(outputs, batch.targets)
            self.optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
        if s.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for p in self.module.parameters() if p.requires_grad], s.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        self.images_seen += batch.num_images
        return {k: float(v.detach()) for k, v in losses.items()}

    @torch.no_grad()
    def validate(self, data: TensorSet, batch_size: int = 32) -> dict[str, float]:
        """val/loss, val/iou, val/dice, val/cgF1 (... every category queried on every image, no augmentation)."""
        module = self.module
        module.eval()
        criterion = module.criterion
        criterion.weight_dict["loss_presence"] = self.presence_weight
        data = data.to(self.device)
        maker = BatchMaker.build(data, self.tokenizer, self.mean, self.std, negative_ratio=None)
        module.iou_dice.reset()
        module.cgf1.reset()
        total, rows = 0.0, 0
        for start in range(0, len(data), batch_size):
            batch = maker(torch.arange(start, min(start + batch_size, len(data))))
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.settings.bf16):
                outputs = module(batch)
            indices = criterion.match(outputs, batch.targets)
            total += float(criterion(outputs, batch.targets, indices=indices)["loss"]) * batch.num_rows
            rows += batch.num_rows
            module.update_metrics(batch, outputs, indices, with_ap=False)
        metrics = {"val/loss": total / max(rows, 1)}
        metrics.update({f"val/{k}": float(v) for k, v in module.iou_dice.compute().items()})
        metrics.update({f"val/{k}": float(v) for k, v in module.cgf1.compute().items()})
        module.train()
        return metrics

    # -------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "version": STATE_VERSION,
            "settings": asdict(self.settings),
            "model": {k: v.detach().cpu() for k, v in self.module.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "images_seen": self.images_seen,
            "seconds": self.seconds,
            "best": self.best,
            "history": self.history,
            "meta": self.meta,
            "rng": rng,
        }

    def save(self, path: Path) -> None:
        """Write the whole state to ``path`` (temporary file + rename: the old state or the new one, never a mix)."""
        with atomic_file(path) as tmp:
            torch.save(self.state_dict(), tmp)

    def _replay_schedule(self) -> None:
        """Rebuild the scheduler at ``self.step`` by stepping a fresh one from the peak learning rates: the learning
        rate is a function of (step, ``settings.steps``), so this restores it exactly, and a resumed run with a new
        total follows the schedule of that total from here (a restored SequentialLR would keep the old milestones).
        """
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"]
        self.scheduler = self.schedule.build(self.optimizer, self.settings.steps)
        with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": intended here
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(self.step):
                self.scheduler.step()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue a run saved by :meth:`save` (a state's ``scheduler`` entry, if any, is not needed)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"pretraining state version {state.get('version')}, expected {STATE_VERSION}")
        self.module.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.images_seen = int(state["step"]), int(state["images_seen"])
        self._replay_schedule()
        self.seconds = float(state["seconds"])
        self.best, self.history = dict(state["best"]), list(state["history"])
        self.meta = dict(state.get("meta", {}))
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])


def settings_from_dict(data: dict[str, Any]) -> PretrainSettings:
    """:class:`PretrainSettings` from :func:`dataclasses.asdict` output (as stored in a state file)."""
    values = dict(data)
    aug = dict(values.pop("augment", {}))
    if "scale_range" in aug:
        aug["scale_range"] = tuple(aug["scale_range"])
    return PretrainSettings(**values, augment=AugmentSettings(**aug))


def load_state(path: Path) -> dict[str, Any]:
    """A state file written by :meth:`Pretrainer.save` (tensors on the CPU)."""
    return torch.load(path, map_location="cpu", weights_only=False)


def epochs_of(trainer: Pretrainer) -> float:
    """Passes over the training images so far."""
    return trainer.images_seen / max(len(trainer.train_data), 1)


__all__ = [
    "AugmentSettings", "BatchMaker", "PretrainSettings", "Pretrainer", "RenderSettings", "TensorSet",
    "epochs_of", "load_or_render", "load_state", "render_set", "settings_from_dict", "spread_reference_boxes",
]
