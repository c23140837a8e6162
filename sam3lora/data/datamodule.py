"""``Sam3DataModule``: reader -> transforms -> rows -> :class:`~sam3lora.data.batch.Sam3Batch`.

One dataset item is one image with all of its rows (prompts); the collate groups rows by image, so the
vision encoder runs once per image. Randomness is a function of ``(seed, epoch, index)`` only (numpy
``SeedSequence`` for rows, ``A.Compose.set_random_seed`` for augmentation), so a batch does not depend on
``num_workers``; the shuffle uses a ``torch.Generator`` seeded from ``(seed, epoch)`` and
:func:`seed_worker` seeds each worker's global RNGs (for user transforms that use them).

Bad samples: when a split is opened the reader's up-front checks run (:meth:`DatasetReader.problems`; for the COCO
reader every check of ``sam3lora-data validate`` but the whole decode of each image, which stays lazy: a header
read per image instead of a decode); a sample may still fail when loaded (a truncated or undecodable file:
:class:`BadSampleError`). ``on_bad_sample: raise`` refuses the split with every problem found up front
(:class:`~sam3lora.data.validate.DatasetProblems`, the first file first) or stops at a sample that fails to load;
``skip`` skips exactly the bad samples (those found up front and those that fail), logs each one and the count of
distinct bad samples at the end of the epoch. A problem that spoils the whole split (unreadable json, duplicate
image or category ids) is refused under both. Training replaces a skipped image by the next good one (batches
never come out empty); validation drops it (no duplicated image ids in evaluation), so a validation batch may
hold no rows.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from sam3lora.data.batch import Sam3Batch
from sam3lora.data.data_error import DataError
from sam3lora.data.readers import BadSampleError, DatasetReader, ReaderFactory, build_reader
from sam3lora.data.rows import PromptSettings, Row, build_rows
from sam3lora.data.transforms import Sam3Transform, build_transform
from sam3lora.data.validate import DatasetProblems, Issue
from sam3lora.sam3 import PAD_LABEL, TEXT_LENGTH, VISUAL_PROMPT, tokenize

log = logging.getLogger(__name__)
ON_BAD_SAMPLE = ("raise", "skip")
SKIP_HINT = "data.on_bad_sample=skip skips bad samples"


@dataclass
class ImageSample:
    """One dataset item: an image after transforms and its rows (see ``TransformedImage`` for shapes)."""

    pixel_values: torch.Tensor
    masks: torch.Tensor
    has_mask: torch.Tensor
    boxes: torch.Tensor
    rows: list[Row]
    image_id: int
    orig_size: tuple[int, int]


def _plain(value: Any) -> Any:
    """OmegaConf containers -> plain Python (no-op for anything else)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf comes with hydra
        return value
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


def seed_worker(worker_id: int) -> None:
    """``worker_init_fn``: seed ``random`` and ``numpy``'s global RNGs from the worker's torch seed."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


class Sam3Dataset(Dataset):
    """Images of one split -> :class:`ImageSample` (``None`` for a skipped bad sample in validation)."""

    def __init__(
        self,
        reader: DatasetReader,
        transform: Sam3Transform,
        settings: PromptSettings,
        *,
        train: bool,
        seed: int,
        on_bad_sample: str,
    ) -> None:
        self.reader = reader
        self.records = list(reader.images())
        self.prompts = {int(k): list(v) for k, v in reader.categories().items()}
        if not self.prompts:
            raise ValueError(f"{type(reader).__name__}({reader.root}, {reader.split}) has no categories")
        self.transform = transform
        self.settings = settings
        self.train = train
        self.seed = int(seed)
        self.on_bad_sample = on_bad_sample
        self.epoch = torch.zeros((), dtype=torch.int64).share_memory_()  # shared with workers
        self.bad = torch.zeros(len(self.records), dtype=torch.bool).share_memory_()  # bad this epoch, by index
        self.known_bad = self._check(list(reader.problems()))

    def _check(self, issues: list[Issue]) -> dict[int, tuple[str, str]]:
        """Refuse the split's up-front problems (``raise``, or any fatal one) or map each bad sample's index to
        its first problem (``skip``); problems tied to no sample (an annotation of a missing image) are logged."""
        split, root = self.reader.split, self.reader.root
        if not issues:
            return {}
        if self.on_bad_sample == "raise" or any(i.fatal for i in issues):
            hint = f"; {SKIP_HINT}" if not any(i.fatal for i in issues) else ""
            if len(issues) > 20:  # the message shows 20; the log holds them all
                for issue in issues:
                    log.error("%s", issue)
            raise DatasetProblems(issues[0].file, issues,
                                  f"{len(issues)} problem(s) in split '{split}' of {root}{hint}")
        index: dict[int, list[int]] = {}
        for k, record in enumerate(self.records):
            index.setdefault(record.id, []).append(k)
        known: dict[int, tuple[str, str]] = {}
        for issue in issues:
            if issue.sample is None:
                log.warning("%s split: ignored (on_bad_sample=skip): %s", split, issue.located())
                continue
            for k in index.get(issue.sample, []):
                known.setdefault(k, (issue.file, issue.message if issue.id is None else
                                     f"[id {issue.id}] {issue.message}"))
        if known:
            log.warning("%s split: %d bad sample(s) found when opening %s will be skipped (on_bad_sample=skip)",
                        split, len(known), root)
        return known

    def __len__(self) -> int:
        return len(self.records)

    def start_epoch(self, epoch: int | None = None) -> None:
        """Called by the loader before each pass: advance (or set) the epoch, reset the bad-sample count."""
        self.epoch.fill_(int(self.epoch) + 1 if epoch is None else epoch)
        self.bad.zero_()

    def bad_count(self) -> int:
        """Distinct bad samples met this epoch (a sample tried again by a later index counts once)."""
        return int(self.bad.sum())

    def _load(self, index: int) -> ImageSample:
        if index in self.known_bad:
            raise BadSampleError(*self.known_bad[index])
        record = self.records[index]
        image = self.reader.load_image(record)
        instances = self.reader.instances(record)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise BadSampleError(record.path, f"image must be RGB uint8 (H, W, 3), got {image.dtype} {image.shape}")
        for k, inst in enumerate(instances):
            if inst.mask is not None and inst.mask.shape != image.shape[:2]:
                raise BadSampleError(record.path, f"instance {k}: mask {inst.mask.shape} != image {image.shape[:2]}")
        seq = np.random.SeedSequence([self.seed, int(self.epoch) if self.train else 0, index])
        aug_seed, row_seed = (int(v) for v in seq.generate_state(2))
        out = self.transform(image, instances, seed=aug_seed)
        rows = build_rows(
            out.category_ids, out.boxes.numpy(), self.prompts, self.settings, np.random.default_rng(row_seed),
            train=self.train,
        )
        return ImageSample(
            pixel_values=out.pixel_values, masks=out.masks, has_mask=out.has_mask, boxes=out.boxes, rows=rows,
            image_id=record.id, orig_size=(record.height, record.width),
        )

    def _report(self, index: int, err: BadSampleError) -> None:
        if not bool(self.bad[index]):
            self.bad[index] = True
            log.warning("skipping bad sample %d (%s): %s", index, self.reader.split, err)

    def __getitem__(self, index: int) -> ImageSample | BadSampleFailure | None:
        if self.on_bad_sample == "raise":
            try:
                return self._load(index)
            except BadSampleError as err:
                problem = f"{err.problem} ({SKIP_HINT})"
                if torch.utils.data.get_worker_info() is None:
                    raise BadSampleError(err.path, problem) from None
                # in a worker: the loader re-raises it in the main process (a worker's exception would arrive
                # as a RuntimeError holding the worker's traceback, the useful line last)
                return BadSampleFailure(err.path, problem)
        tries = len(self.records) if self.train else 1
        for k in range(tries):
            i = (index + k) % len(self.records)
            try:
                return self._load(i)
            except BadSampleError as err:
                self._report(i, err)
        if self.train:
            raise RuntimeError(f"every sample of split '{self.reader.split}' under {self.reader.root} is bad")
        return None


@dataclass(frozen=True)
class BadSampleFailure:
    """A bad sample met in a DataLoader worker under ``on_bad_sample: raise``; the collate passes it through in
    place of the batch and :class:`Sam3DataLoader` raises it as :class:`BadSampleError` in the main process."""

    path: str
    problem: str


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
        )


class Sam3DataLoader(DataLoader):
    """DataLoader that starts an epoch on its :class:`Sam3Dataset` and logs the bad-sample count after it.

    Its generator is reseeded from ``(seed, epoch)`` at each pass, so a resumed run (epoch restored by
    ``Sam3DataModule.load_state_dict``) shuffles and augments as the uninterrupted run would.
    """

    def __iter__(self) -> Iterator[Any]:
        dataset = self.dataset
        if not isinstance(dataset, Sam3Dataset):
            yield from super().__iter__()
            return
        dataset.start_epoch()
        if self.generator is not None:  # shuffle order (and worker seeds) as a function of (seed, epoch)
            seq = np.random.SeedSequence([dataset.seed, int(dataset.epoch)])
            self.generator.manual_seed(int(seq.generate_state(1)[0]))
        try:
            for batch in super().__iter__():
                if isinstance(batch, BadSampleFailure):
                    raise BadSampleError(batch.path, batch.problem)
                yield batch
        finally:
            if dataset.bad_count():
                log.warning(
                    "%s split: skipped %d bad sample(s) this epoch (on_bad_sample=skip)",
                    dataset.reader.split, dataset.bad_count(),
                )


class Sam3DataModule(L.LightningDataModule):
    """Training/validation data for SAM 3 fine-tuning (see the module docstring and ``conf/data/*.yaml``, the one
    place the arguments' values are stated: ``sam3lora.config.defaults("data/coco", processor=..., root=...)``).

    Args:
        processor: a ``Sam3Processor`` (its ``tokenizer`` and ``image_processor`` mean/std/rescale are used).
        root: dataset directory (canonical layout for the default reader; the YOLO cache with ``yolo_src``).
        image_size: S, the model's square input size.
        reader: None (:class:`CocoReader`), a callable ``(root, split) -> DatasetReader`` or a Hydra
            ``_target_`` mapping naming one (instantiated with ``root`` and ``split``).
        train_split, val_split: split names given to the reader.
        prompt_mode, negative_ratio, max_prompts_per_image, max_exemplars: see :class:`PromptSettings`.
        train_transforms, val_transforms: transform configs (see :mod:`sam3lora.data.transforms`).
        batch_size: images per batch (rows per batch vary).
        num_workers, pin_memory, persistent_workers: DataLoader settings (persistent needs workers > 0).
        seed: shuffle and augmentation seed.
        on_bad_sample: ``raise`` or ``skip``.
        yolo_src: a YOLO dataset converted once into ``root`` by :meth:`prepare_data`.
        synthetic: arguments of :func:`sam3lora.data.synthetic.write_synthetic` (train, val, size, seed,
            categories) and optionally ``root``, the one place it may generate into; :meth:`prepare_data`
            generates that set into ``root`` when ``root`` holds no dataset yet and is that place.
    """

    def __init__(
        self,
        processor: Any,
        root: str | Path,
        image_size: int,
        reader: ReaderFactory | Mapping[str, Any] | None,
        train_split: str,
        val_split: str,
        prompt_mode: str,
        negative_ratio: float | None,
        max_prompts_per_image: int | None,
        max_exemplars: int,
        train_transforms: Mapping[str, Any] | None,
        val_transforms: Mapping[str, Any] | None,
        batch_size: int,
        num_workers: int,
        pin_memory: bool,
        persistent_workers: bool,
        seed: int,
        on_bad_sample: str,
        yolo_src: str | Path | None,
        synthetic: Mapping[str, Any] | None,
    ) -> None:
        super().__init__()
        if on_bad_sample not in ON_BAD_SAMPLE:
            raise ValueError(f"on_bad_sample must be one of {ON_BAD_SAMPLE}, got {on_bad_sample!r}")
        if int(batch_size) < 1:
            raise ValueError(f"data.batch_size must be >= 1 (images per batch), got {batch_size}")
        if int(num_workers) < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {num_workers}")
        if processor is None or not hasattr(processor, "tokenizer") or not hasattr(processor, "image_processor"):
            raise TypeError("processor must be a Sam3Processor (with .tokenizer and .image_processor)")
        self.processor = processor
        self.root = Path(str(root))
        self.image_size = int(image_size)
        self.reader = _plain(reader)
        self.splits = {"train": str(train_split), "val": str(val_split)}
        self.settings = PromptSettings(
            mode=prompt_mode,  # type: ignore[arg-type]
            negative_ratio=None if negative_ratio is None else float(negative_ratio),
            max_prompts_per_image=None if max_prompts_per_image is None else int(max_prompts_per_image),
            max_exemplars=int(max_exemplars),
        )
        ip = processor.image_processor
        norm = dict(
            image_size=self.image_size, mean=list(ip.image_mean), std=list(ip.image_std),
            rescale_factor=float(getattr(ip, "rescale_factor", 1 / 255)) if getattr(ip, "do_rescale", True) else 1.0,
        )
        self.train_transform = build_transform(_plain(train_transforms), train=True, **norm)
        self.val_transform = build_transform(_plain(val_transforms), train=False, **norm)
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.pin_memory = bool(pin_memory)
        self.persistent_workers = bool(persistent_workers) and self.num_workers > 0
        self.seed = int(seed)
        self.on_bad_sample = on_bad_sample
        self.yolo_src = None if yolo_src is None else Path(str(yolo_src))
        self.synthetic = None if synthetic is None else dict(_plain(synthetic))
        if self.synthetic is not None and self.yolo_src is not None:
            raise ValueError("data.synthetic and data.yolo_src are exclusive: root is generated or converted, not both")
        self.train_dataset: Sam3Dataset | None = None
        self.val_dataset: Sam3Dataset | None = None
        self._collate: Sam3Collate | None = None
        self._start_epoch = 0

    # -------------------------------------------------------------------------------------- preparation

    def prepare_data(self) -> None:
        """Generate the synthetic set, or convert ``yolo_src``, into ``root`` once (an existing one is reused).

        A synthetic set is generated only where it was asked for: into ``synthetic['root']`` when that key is
        given (the data config's own location, ``data.synthetic.root``), else into ``root``. A ``root`` that does
        not exist and is not that location is an error naming it (a typo never becomes a generated dataset)."""
        if self.synthetic is not None:
            self._prepare_synthetic()
            return
        if self.yolo_src is None:
            self._check_root()
            return
        from sam3lora.data.yolo import yolo_to_coco

        marker = self.root / ".yolo_source"
        source = str(self.yolo_src.resolve())
        if self.root.is_dir() and any(self.root.iterdir()):
            recorded = marker.read_text(encoding="utf-8").strip() if marker.is_file() else None
            if recorded is not None and recorded != source:
                raise DataError(self.root, f"YOLO cache was converted from {recorded}, not {source}; "
                                           "delete it or choose another data.root")
            log.info("using the YOLO conversion cached at %s (delete it to convert again)", self.root)
            return
        log.info("converting YOLO dataset %s into %s", self.yolo_src, self.root)
        yolo_to_coco(self.yolo_src, self.root)
        marker.write_text(source + "\n", encoding="utf-8")

    def _uses_coco_reader(self) -> bool:
        target = self.reader.get("_target_", "") if isinstance(self.reader, Mapping) else ""
        return self.reader is None or str(target).endswith("CocoReader")

    def _check_root(self) -> None:
        """The default reader's ``root`` must exist (custom readers may read from elsewhere)."""
        if self._uses_coco_reader() and not self.root.exists():
            raise DataError(self.root, "data.root does not exist")

    def _prepare_synthetic(self) -> None:
        from sam3lora.data.synthetic import write_synthetic

        settings = dict(self.synthetic or {})
        into = settings.pop("root", None)
        if (self.root / self.splits["train"] / "annotations.json").is_file():
            return
        if into is not None and os.path.realpath(str(into)) != os.path.realpath(self.root):
            where = "does not exist" if not self.root.exists() else (
                f"holds no dataset ({self.splits['train']}/annotations.json not found)")
            raise DataError(self.root, f"data.root {where}; a synthetic set is generated only into "
                                       f"data.synthetic.root ({into}): set data.synthetic.root to generate one here")
        log.info("generating the synthetic dataset into %s", self.root)
        write_synthetic(self.root, **settings)

    def _dataset(self, stage: str) -> Sam3Dataset:
        train = stage == "train"
        reader = build_reader(self.reader, self.root, self.splits[stage])
        transform = self.train_transform if train else self.val_transform
        return Sam3Dataset(reader, transform, self.settings, train=train, seed=self.seed,
                           on_bad_sample=self.on_bad_sample)

    def setup(self, stage: str | None = None) -> None:
        """Build the readers (COCO index) once per split needed by ``stage`` and the prompt token cache."""
        if stage in (None, "fit") and self.train_dataset is None:
            self.train_dataset = self._dataset("train")
            self.train_dataset.epoch.fill_(self._start_epoch)
        if stage in (None, "fit", "validate") and self.val_dataset is None:
            self.val_dataset = self._dataset("val")
        datasets = [d for d in (self.train_dataset, self.val_dataset) if d is not None]
        texts = sorted({p for d in datasets for ps in d.prompts.values() for p in ps} | {VISUAL_PROMPT})
        if self._collate is None or set(texts) - set(self._collate.cache):
            ids, mask = tokenize(self.processor.tokenizer, texts)
            cache = {t: (ids[i], mask[i]) for i, t in enumerate(texts)}
            self._collate = Sam3Collate(self.processor.tokenizer, cache, self.image_size)

    # -------------------------------------------------------------------------------------- loaders

    def _loader(self, dataset: Sam3Dataset | None, shuffle: bool) -> Sam3DataLoader:
        if dataset is None or self._collate is None:
            raise RuntimeError("Sam3DataModule.setup() must run before asking for a dataloader")
        generator = torch.Generator().manual_seed(self.seed)
        return Sam3DataLoader(
            dataset, batch_size=self.batch_size, shuffle=shuffle, collate_fn=self._collate,
            num_workers=self.num_workers, pin_memory=self.pin_memory, persistent_workers=self.persistent_workers,
            worker_init_fn=seed_worker, generator=generator,
        )

    def train_dataloader(self) -> Sam3DataLoader:
        return self._loader(self.train_dataset, shuffle=True)

    def val_dataloader(self) -> Sam3DataLoader:
        return self._loader(self.val_dataset, shuffle=False)

    # -------------------------------------------------------------------------------------- resume

    def state_dict(self) -> dict[str, Any]:
        """Epoch counter of the training augmentation (saved in checkpoints)."""
        epoch = int(self.train_dataset.epoch) if self.train_dataset is not None else self._start_epoch
        return {"epoch": epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._start_epoch = int(state_dict.get("epoch", 0))
        if self.train_dataset is not None:
            self.train_dataset.epoch.fill_(self._start_epoch)

