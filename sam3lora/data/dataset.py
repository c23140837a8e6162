"""One split as a map-style dataset: reader -> transforms -> rows, one :class:`ImageSample` per image.

Randomness is a function of ``(seed, epoch, index)`` only (numpy ``SeedSequence`` for rows,
``A.Compose.set_random_seed`` for augmentation), so an item does not depend on ``num_workers``: items are keyed by
``(epoch, index)``, which :class:`EpochSampler` hands out (no epoch state shared with the workers).

Bad samples: when a split is opened the reader's up-front checks run (:meth:`DatasetReader.problems`; for the COCO
reader every check of ``sam3lora-data validate`` but the whole decode of each image, which stays lazy: a header
read per image instead of a decode); a sample may still fail when loaded (a truncated or undecodable file:
:class:`BadSampleError`). ``on_bad_sample: raise`` refuses the split with every problem found up front
(:class:`~sam3lora.data.validate.DatasetProblems`, the first file first) or stops at a sample that fails to load;
``skip`` skips exactly the bad samples (those found up front and those that fail), logs each one and the count of
distinct bad samples per pass (when the next pass starts, and at teardown). A problem that spoils the whole split
(unreadable json, duplicate image or category ids) is refused under both. Training replaces a skipped image by the
next good one (batches never come out empty); validation drops it (no duplicated image ids in evaluation), so a
validation batch may hold no rows.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from sam3lora.data.readers import BadSampleError, DatasetReader
from sam3lora.data.rows import PromptSettings, Row, build_rows
from sam3lora.data.transforms import Sam3Transform
from sam3lora.data.validate import DatasetProblems, Issue

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
        self.bad = torch.zeros(len(self.records), dtype=torch.bool).share_memory_()  # bad this pass, by index
        self.pass_epoch: int | None = None  # the epoch of the pass under way (main process)
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

    def start_pass(self, epoch: int) -> None:
        """Called by :class:`EpochSampler` (main process) before a pass hands out any index: report the previous
        pass's bad samples (:meth:`report_bad`) and reset the count."""
        self.report_bad()
        self.pass_epoch = epoch

    def report_bad(self) -> None:
        """Log the distinct bad samples of the pass under way, once, and reset the count (called at the next
        pass and by ``Sam3DataModule.teardown``)."""
        if self.bad_count():
            log.warning("%s split, epoch %d: skipped %d bad sample(s) (on_bad_sample=skip)",
                        self.reader.split, self.pass_epoch or 0, self.bad_count())
        self.bad.zero_()

    def bad_count(self) -> int:
        """Distinct bad samples met this pass (a sample tried again by a later index counts once)."""
        return int(self.bad.sum())

    def _load(self, epoch: int, index: int) -> ImageSample:
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
        seq = np.random.SeedSequence([self.seed, epoch if self.train else 0, index])
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

    def __getitem__(self, key: int | tuple[int, int]) -> ImageSample | BadSampleFailure | None:
        """``key``: ``(epoch, index)`` as :class:`EpochSampler` yields them, or an index (epoch 0)."""
        epoch, index = key if isinstance(key, tuple) else (0, key)
        if self.on_bad_sample == "raise":
            try:
                return self._load(epoch, index)
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
                return self._load(epoch, i)
            except BadSampleError as err:
                self._report(i, err)
        if self.train:
            raise RuntimeError(f"every sample of split '{self.reader.split}' under {self.reader.root} is bad")
        return None



@dataclass(frozen=True)
class BadSampleFailure:
    """A bad sample met in a DataLoader worker under ``on_bad_sample: raise``; the collate passes it through in
    place of the batch and ``Sam3DataModule.on_before_batch_transfer`` raises it as :class:`BadSampleError` in the
    main process."""

    path: str
    problem: str


class EpochSampler(Sampler[tuple[int, int]]):
    """Yields ``(epoch, index)`` for every item of a :class:`Sam3Dataset`, shuffled (training) as a function of
    ``(seed, epoch)`` only, so a resumed run sees the order and augmentation of the uninterrupted one.

    ``epoch`` counts passes (1 for the first). Lightning calls :meth:`set_epoch` with its 0-based epoch before each
    training epoch, which fixes the next pass to ``epoch + 1``; without it each pass advances by one (plain loops,
    and DDP, where the distributed wrapper takes the ``set_epoch`` call). ``Sam3DataModule`` saves ``epoch`` in
    checkpoints.
    """

    def __init__(self, dataset: Sam3Dataset, shuffle: bool, seed: int, epoch: int = 0) -> None:
        super().__init__()
        self.dataset = dataset
        self.shuffle = shuffle
        self.seed = int(seed)
        self.epoch = int(epoch)  # passes started
        self._next: int | None = None

    def set_epoch(self, epoch: int) -> None:
        self._next = int(epoch) + 1

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        self.epoch = self.epoch + 1 if self._next is None else self._next
        self._next = None
        self.dataset.start_pass(self.epoch)
        order = range(len(self.dataset))
        if self.shuffle:
            seq = np.random.SeedSequence([self.seed, self.epoch])
            order = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(
                int(seq.generate_state(1)[0]))).tolist()
        return iter([(self.epoch, i) for i in order])
