"""Prediction, evaluation and deployment: ``Sam3LoRAPredictor`` and the helpers the CLIs share."""

from sam3lora.inference.errors import AdapterLoadError, ImageReadError, PredictorError, PromptError
from sam3lora.inference.predictor import Prompt, PromptResult, Sam3LoRAPredictor, make_prompts

__all__ = [
    "AdapterLoadError",
    "ImageReadError",
    "PredictorError",
    "Prompt",
    "PromptError",
    "PromptResult",
    "Sam3LoRAPredictor",
    "make_prompts",
]
