"""SAM 3 loading: the real model from the hub or a local directory, and the offline ``tiny`` preset."""

from sam3lora.model.load_base import HUB_ID, ModelLoadError, load_model, meta_model, resolve
from sam3lora.model.tiny import build_tiny, materialise_tiny

__all__ = ["HUB_ID", "ModelLoadError", "build_tiny", "load_model", "materialise_tiny", "meta_model", "resolve"]
