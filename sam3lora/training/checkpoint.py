"""Checkpoints that are whole or absent, and that carry the best across a resume into a new run directory.

- :class:`AtomicCheckpointIO`: every checkpoint is written to a temporary file in its own directory and renamed
  onto its final name (Lightning's ``TorchCheckpointIO`` stages local files in the system temp directory and
  copies them over, so a full disk leaves a partial ``best.ckpt`` at the final path).
- :class:`RunCheckpoint`: Lightning's ``ModelCheckpoint`` that, resumed from a checkpoint written in another
  directory (``ckpt_path=<old run>/checkpoints/last.ckpt``, where Hydra makes a new run directory), copies the
  earlier run's best checkpoint into its own directory and keeps its score, instead of forgetting both.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from sam3lora.io import atomic_file

log = logging.getLogger(__name__)


def _is_local(path: str | os.PathLike[str]) -> bool:
    text = str(path)
    return "://" not in text or text.startswith("file://")


def _local(path: str | os.PathLike[str]) -> Path:
    return Path(str(path).removeprefix("file://"))


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local checkpoints appear whole or not at all (temp file beside the target,
    fsync, ``os.replace``); remote paths (``s3://`` ...) are left to Lightning."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        with atomic_file(_local(path)) as tmp, open(tmp, "wb") as f:
            torch.save(checkpoint, f)


def use_atomic_checkpoints(trainer: Any) -> None:
    """Give ``trainer``'s strategy an :class:`AtomicCheckpointIO` unless the user configured another CheckpointIO."""
    strategy = trainer.strategy
    if type(strategy.checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()


def _copy_file(src: Path, dst: Path) -> None:
    with atomic_file(dst) as tmp:
        shutil.copyfile(src, tmp)


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that keeps the best across a resume into another directory.

    Resumed from a checkpoint whose callback state names another ``dirpath``, it copies the files that state
    refers to (the best / top-k checkpoints, the latest one) from the earlier directory into ``dirpath`` and
    restores their scores, so the resumed run's best is the best of all epochs and lives in its own directory.
    If the earlier best checkpoint is gone (or was overwritten after the resumed checkpoint was written), it says
    so in one warning and the best is chosen among the resumed epochs. The state key is ``ModelCheckpoint``'s, so
    checkpoints written with either class resume with the other.
    """

    @property
    def state_key(self) -> str:
        return super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        old_dir = state_dict.get("dirpath")
        if old_dir is None or self.dirpath is None or not (_is_local(old_dir) and _is_local(self.dirpath)):
            super().load_state_dict(state_dict)
            return
        if os.path.realpath(_local(old_dir)) == os.path.realpath(_local(self.dirpath)):
            super().load_state_dict(state_dict)
            return
        self._load_from_other_dir(state_dict, _local(old_dir))

    def _load_from_other_dir(self, state: dict[str, Any], old_dir: Path) -> None:
        new_dir = _local(self.dirpath)
        best = state.get("best_model_path") or ""
        problem = None
        if best and not Path(best).is_file():
            problem = f"its best checkpoint {best} is missing"
        elif best and self.monitor is not None and not self._holds_score(Path(best), state.get("best_model_score")):
            problem = f"its best checkpoint {best} was overwritten after the checkpoint resumed from was written"
        if problem:
            log.warning("resuming into %s from a run in %s: %s; the best is chosen among the resumed epochs",
                        new_dir, old_dir, problem)
            self.best_model_path = ""
            return
        moved: dict[str, str] = {}

        def carry(path: str) -> str:
            if not path:
                return ""
            if path not in moved:
                src = Path(path)
                dst = new_dir / src.name
                if src.is_file():
                    _copy_file(src, dst)
                    log.info("resume: copied %s to %s", src, dst)
                    moved[path] = str(dst)
                else:
                    return ""
            return moved[path]

        best_k = {carry(p): score for p, score in (state.get("best_k_models") or {}).items()}
        self.best_k_models = {p: s for p, s in best_k.items() if p}
        self.best_model_path = carry(best)
        self.best_model_score = state.get("best_model_score")
        self.kth_best_model_path = carry(state.get("kth_best_model_path") or "")
        self.kth_value = state.get("kth_value", self.kth_value)
        self.last_model_path = carry(state.get("last_model_path") or "")

    def _holds_score(self, path: Path, score: Any) -> bool:
        """Whether the checkpoint at ``path`` is the one that scored ``score`` (its own state records it)."""
        if score is None:
            return True
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        except Exception:  # unreadable: treat as not the one
            return False
        own = (checkpoint.get("callbacks") or {}).get(self.state_key) or {}
        recorded = own.get("best_model_score")
        return recorded is not None and float(recorded) == float(score)
