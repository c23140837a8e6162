"""``Sam3DataModule``: the Lightning data module of training (``conf/data/*.yaml``).

It prepares the set (a generated synthetic set or a YOLO conversion, once), opens one :class:`Sam3Dataset` per
split, tokenises every prompt once for the collate (:class:`Sam3Collate`, rows grouped by image so the vision
encoder runs once per image) and serves loaders whose :class:`EpochSampler` keys items by ``(epoch, index)``: a
batch depends on ``(seed, epoch, index)`` only, not on ``num_workers``, and the epoch it saves in checkpoints makes a
resumed run repeat the uninterrupted one. Workers seed their global RNGs (for user transforms that use them) with
Lightning's ``pl_worker_init_function``. Bad samples: see :mod:`sam3lora.data.dataset`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.utilities.seed import pl_worker_init_function
from torch.utils.data import DataLoader

from sam3lora.config import instantiate_node
from sam3lora.data.collate import Sam3Collate
from sam3lora.data.data_error import DataError
from sam3lora.data.dataset import ON_BAD_SAMPLE, BadSampleFailure, EpochSampler, Sam3Dataset
from sam3lora.data.readers import BadSampleError, ReaderFactory, build_reader
from sam3lora.data.rows import PROMPTS_KEY, PromptSettings
from sam3lora.data.transforms import build_transform
from sam3lora.sam3 import VISUAL_PROMPT, tokenize

log = logging.getLogger(__name__)


def _plain(value: Any) -> Any:
    """OmegaConf containers -> plain Python (no-op for anything else)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf comes with hydra
        return value
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


class Sam3DataModule(L.LightningDataModule):
    """Training/validation data for SAM 3 fine-tuning (see the module docstring and ``conf/data/*.yaml``, the one
    place the arguments' values are stated: ``sam3lora.config.defaults("data/coco", processor=..., root=...)``).

    Args:
        processor: a ``Sam3Processor`` (its ``tokenizer`` and ``image_processor`` mean/std/rescale are used).
        root: dataset directory (canonical layout for the default reader; the YOLO cache with ``yolo_src``).
        image_size: S, the model's square input size.
        reader: None (:class:`~sam3lora.data.readers.CocoReader`), a callable ``(root, split) -> DatasetReader``
            or a Hydra ``_target_`` mapping naming one (instantiated with ``root`` and ``split``).
        train_split, val_split: split names given to the reader.
        prompts: how images become prompt rows: a :class:`~sam3lora.data.rows.PromptSettings`, or its config node
            (``data.prompts``, a ``_target_`` mapping; the data configs are not built recursively).
        train_transforms, val_transforms: transform configs (see :mod:`sam3lora.data.transforms`).
        batch_size: images per batch (rows per batch vary).
        num_workers, pin_memory, persistent_workers: DataLoader settings (persistent needs workers > 0).
        seed: shuffle and augmentation seed.
        on_bad_sample: ``raise`` or ``skip``.
        yolo_src: a YOLO dataset converted once into ``root`` by :meth:`prepare_data`.
        synthetic: arguments of :func:`sam3lora.data.synthetic_shapes.write_synthetic` (train, val, size, seed,
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
        prompts: PromptSettings | Mapping[str, Any],
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
        self.settings = prompts if isinstance(prompts, PromptSettings) else instantiate_node(prompts)
        if not isinstance(self.settings, PromptSettings):
            raise TypeError(f"{PROMPTS_KEY} must build a sam3lora.data.rows.PromptSettings (a _target_ mapping), "
                            f"got {type(self.settings).__name__}")
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
        self._train_sampler: EpochSampler | None = None

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
        from sam3lora.data.synthetic_shapes import write_synthetic

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
        if stage in (None, "fit", "validate") and self.val_dataset is None:
            self.val_dataset = self._dataset("val")
        datasets = [d for d in (self.train_dataset, self.val_dataset) if d is not None]
        texts = sorted({p for d in datasets for ps in d.prompts.values() for p in ps} | {VISUAL_PROMPT})
        if self._collate is None or set(texts) - set(self._collate.cache):
            ids, mask = tokenize(self.processor.tokenizer, texts)
            cache = {t: (ids[i], mask[i]) for i, t in enumerate(texts)}
            self._collate = Sam3Collate(self.processor.tokenizer, cache, self.image_size)

    # -------------------------------------------------------------------------------------- loaders

    def _loader(self, dataset: Sam3Dataset | None, sampler: EpochSampler) -> DataLoader:
        if dataset is None or self._collate is None:
            raise RuntimeError("Sam3DataModule.setup() must run before asking for a dataloader")
        return DataLoader(
            dataset, batch_size=self.batch_size, sampler=sampler, collate_fn=self._collate,
            num_workers=self.num_workers, pin_memory=self.pin_memory, persistent_workers=self.persistent_workers,
            worker_init_fn=pl_worker_init_function,
        )

    def train_dataloader(self) -> DataLoader:
        if self.train_dataset is not None:
            self._train_sampler = EpochSampler(self.train_dataset, shuffle=True, seed=self.seed,
                                               epoch=self._start_epoch)
        return self._loader(self.train_dataset, self._train_sampler)  # type: ignore[arg-type]

    def val_dataloader(self) -> DataLoader:
        sampler = EpochSampler(self.val_dataset, shuffle=False, seed=self.seed) if self.val_dataset else None
        return self._loader(self.val_dataset, sampler)  # type: ignore[arg-type]

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """A bad sample met in a worker under ``on_bad_sample: raise`` is raised here, in the main process, as itself
        (file and problem on one line) instead of the worker's traceback."""
        if isinstance(batch, BadSampleFailure):
            raise BadSampleError(batch.path, batch.problem)
        return batch

    def teardown(self, stage: str) -> None:
        """Log the bad samples of the last pass of each split (earlier passes are logged when the next starts)."""
        for dataset in (self.train_dataset, self.val_dataset):
            if dataset is not None:
                dataset.report_bad()

    # -------------------------------------------------------------------------------------- resume

    def state_dict(self) -> dict[str, Any]:
        """The training sampler's epoch (passes started; saved in checkpoints)."""
        return {"epoch": self._train_sampler.epoch if self._train_sampler is not None else self._start_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._start_epoch = int(state_dict.get("epoch", 0))
        if self._train_sampler is not None:
            self._train_sampler.epoch = self._start_epoch

