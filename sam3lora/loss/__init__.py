"""SAM 3 training loss: Hungarian matcher and criterion (see conf/loss/sam3.yaml for the weights)."""

from sam3lora.loss.criterion import Sam3Criterion
from sam3lora.loss.matcher import HungarianMatcher, MatchIndices

__all__ = ["HungarianMatcher", "MatchIndices", "Sam3Criterion"]
