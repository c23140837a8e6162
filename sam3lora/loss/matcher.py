"""One-to-one Hungarian matching between SAM 3 queries and the ground-truth instances of each row.

Follows DETR's ``HungarianMatcher`` and SAM 3's ``BinaryHungarianMatcherV2(focal=True)``: one binary class
(the row's prompt), a focal-style class cost, L1 on normalised cxcywh boxes and negative GIoU.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torchvision.ops import box_convert, box_iou, generalized_box_iou

MatchIndices = list[tuple[Tensor, Tensor]]
"""Per row ``(query_idx, target_idx)``: two int64 CPU tensors of equal length ``min(Q, n)``."""

_BIG_COST = 1e8  # replaces NaN/inf costs so that scipy accepts the matrix


def focal_class_cost(prob: Tensor, alpha: float, gamma: float, eps: float = 1e-8) -> Tensor:
    """Focal-style matching cost of predicting "object" with probability ``prob`` (any shape).

    ``pos - neg`` with ``pos = -alpha (1-p)^gamma log p`` and ``neg = -(1-alpha) p^gamma log(1-p)``, i.e.
    ``-alpha (1-p)^gamma log p + (1-alpha) p^gamma log(1-p)`` (SAM 3 / Deformable DETR). It decreases
    monotonically in ``p``: a confident query is cheap to match.
    """
    pos = alpha * (1 - prob) ** gamma * -(prob + eps).log()
    neg = (1 - alpha) * prob**gamma * -(1 - prob + eps).log()
    return pos - neg


class HungarianMatcher(nn.Module):
    """Hungarian matcher for SAM 3 detection outputs, one (image, prompt) row at a time.

    cost = cost_bbox * L1(cxcywh) + cost_class * focal_class_cost - cost_giou * GIoU(xyxy).
    Rows without targets (negative prompts) get empty matches. Values come from ``conf/loss/sam3.yaml``.
    """

    def __init__(
        self, cost_bbox: float, cost_class: float, cost_giou: float, focal_alpha: float, focal_gamma: float
    ) -> None:
        super().__init__()
        if cost_bbox == 0 and cost_class == 0 and cost_giou == 0:
            raise ValueError("all matching costs are 0")
        self.cost_bbox = cost_bbox
        self.cost_class = cost_class
        self.cost_giou = cost_giou
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    @torch.no_grad()
    def cost_matrix(self, pred_logits: Tensor, pred_boxes: Tensor, tgt_boxes: Tensor) -> Tensor:
        """Cost of assigning each query to each target.

        pred_logits (P,), pred_boxes (P,4) and tgt_boxes (N,4) normalised xyxy -> (P, N) float32.
        """
        logits = pred_logits.float()
        out_xyxy = pred_boxes.float()
        tgt_xyxy = tgt_boxes.to(out_xyxy)
        cost_bbox = torch.cdist(
            box_convert(out_xyxy, "xyxy", "cxcywh"), box_convert(tgt_xyxy, "xyxy", "cxcywh"), p=1
        )
        cost_class = focal_class_cost(logits.sigmoid(), self.focal_alpha, self.focal_gamma)[:, None]
        cost_giou = -generalized_box_iou(out_xyxy, tgt_xyxy)
        return self.cost_bbox * cost_bbox + self.cost_class * cost_class + self.cost_giou * cost_giou

    @torch.no_grad()
    def prepare(self, pred_logits: Tensor, pred_boxes: Tensor, targets: list[dict[str, Tensor]]) -> Tensor:
        """The device half of the matching: the positive rows' cost matrices, flattened.

        Args as ``forward``. Returns a flat float32 tensor on ``pred_logits``' device: for each positive row r (in
        order) its (Q, n_r) cost matrix, row-major (non-finite costs replaced). ``assign`` reads it on the host.
        """
        num_rows, num_queries = pred_logits.shape
        if len(targets) != num_rows:
            raise ValueError(f"{len(targets)} targets for {num_rows} rows")
        pos_rows = [r for r, t in enumerate(targets) if len(t["boxes"]) > 0]
        if not pos_rows:
            return pred_logits.new_empty(0, dtype=torch.float32)
        # one batched cost computation over positive rows (each row's queries against all targets), cut per row
        rows = torch.as_tensor(pos_rows, device=pred_logits.device)
        tgt = torch.cat([targets[r]["boxes"] for r in pos_rows]).to(pred_boxes.device)
        cost = self.cost_matrix(pred_logits[rows].flatten(), pred_boxes[rows].flatten(0, 1), tgt)
        cost = torch.nan_to_num(cost, nan=_BIG_COST, posinf=_BIG_COST, neginf=-_BIG_COST)
        per_row = cost.view(len(pos_rows), num_queries, -1).split([len(targets[r]["boxes"]) for r in pos_rows], -1)
        return torch.cat([c[i].flatten() for i, c in enumerate(per_row)])  # row i against its own targets

    @staticmethod
    def assign(prepared: np.ndarray, num_queries: int, targets: list[dict[str, Tensor]]) -> MatchIndices:
        """The host half: scipy's ``linear_sum_assignment`` on each row of ``prepare``'s output (a NumPy array)."""
        empty = torch.empty(0, dtype=torch.int64)
        indices: MatchIndices = []
        start = 0
        for t in targets:
            n = len(t["boxes"])
            if n == 0:
                indices.append((empty, empty))
                continue
            cost = prepared[start : start + num_queries * n].reshape(num_queries, n)
            start += num_queries * n
            q, j = linear_sum_assignment(cost)
            indices.append((torch.as_tensor(q, dtype=torch.int64), torch.as_tensor(j, dtype=torch.int64)))
        return indices

    def forward(self, pred_logits: Tensor, pred_boxes: Tensor, targets: list[dict[str, Tensor]]) -> MatchIndices:
        """Match queries to targets row by row (one device->host copy; ``match_layers`` shares it among layers).

        Args:
            pred_logits: (R, Q) query logits.
            pred_boxes: (R, Q, 4) normalised xyxy.
            targets: R dicts with ``boxes`` (n, 4) normalised xyxy; n == 0 for a negative prompt.
        Returns:
            R tuples ``(query_idx, target_idx)`` of int64 CPU tensors, query_idx ascending, each of length
            ``min(Q, n)`` (empty for negatives).
        """
        return match_layers([(self, pred_logits, pred_boxes)], targets)[0]


class OneToManyMatcher(nn.Module):
    """Greedy one-to-many matching for SAM 3's DAC queries (official ``BinaryOneToManyMatcher``, DAC-DETR).

    Per row, the quality of query q for target t is ``alpha * sigmoid(logit_q) + (1 - alpha) * IoU(q, t)``.
    Query q is assigned to t when its quality is above the ``1 - topk / Q`` quantile of t's column (about the
    ``topk`` best queries; ``torch.quantile`` with linear interpolation, strict ``>``, as the official code) and
    above ``threshold``. A target may get several queries and, as in the official code, a query may be assigned to
    several targets. Values come from ``conf/loss/sam3.yaml`` (``o2m.matcher``).
    """

    def __init__(self, alpha: float, threshold: float, topk: int) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"loss.o2m.matcher.alpha must be in [0, 1], got {alpha}")
        if int(topk) < 1:
            raise ValueError(f"loss.o2m.matcher.topk must be >= 1, got {topk}")
        self.alpha = float(alpha)
        self.threshold = float(threshold)
        self.topk = int(topk)

    @torch.no_grad()
    def prepare(self, pred_logits: Tensor, pred_boxes: Tensor, targets: list[dict[str, Tensor]]) -> Tensor:
        """The device half: the (R, Q, T) assignment matrix as a flat float32 0/1 tensor (T = the most targets
        of a row; padding columns are 0). Args as ``HungarianMatcher.forward``."""
        num_rows, num_queries = pred_logits.shape
        if len(targets) != num_rows:
            raise ValueError(f"{len(targets)} targets for {num_rows} rows")
        sizes = [len(t["boxes"]) for t in targets]
        if not any(sizes):
            return pred_logits.new_empty(0, dtype=torch.float32)
        # pad the targets to (R, T, 4) so that every row is one batched computation; padding columns are dropped
        boxes = torch.zeros(num_rows, max(sizes), 4, device=pred_boxes.device, dtype=torch.float32)
        for r, t in enumerate(targets):
            boxes[r, : sizes[r]] = t["boxes"].to(boxes)
        iou = torch.stack([box_iou(p, b) for p, b in zip(pred_boxes.float(), boxes, strict=True)])  # (R,Q,T)
        quality = self.alpha * pred_logits.float().sigmoid()[:, :, None] + (1 - self.alpha) * iou
        cutoff = torch.quantile(quality, 1 - self.topk / num_queries, dim=1, keepdim=True)
        counts = torch.tensor(sizes, device=boxes.device)
        valid = torch.arange(boxes.shape[1], device=boxes.device)[None] < counts[:, None]  # (R,T) real targets
        return ((quality > cutoff) & (quality > self.threshold) & valid[:, None, :]).float().flatten()

    @staticmethod
    def assign(prepared: np.ndarray, num_queries: int, targets: list[dict[str, Tensor]]) -> MatchIndices:
        """The host half: ``prepare``'s matrix (a NumPy array) -> per row (query_idx, target_idx), by query, target."""
        empty = torch.empty(0, dtype=torch.int64)
        sizes = [len(t["boxes"]) for t in targets]
        if not any(sizes):
            return [(empty, empty) for _ in targets]
        matches = prepared.reshape(len(targets), num_queries, max(sizes))
        indices: MatchIndices = []
        for row in matches:
            q, j = np.nonzero(row)  # row-major: by query, then target
            indices.append((torch.as_tensor(q, dtype=torch.int64), torch.as_tensor(j, dtype=torch.int64)))
        return indices

    def forward(self, pred_logits: Tensor, pred_boxes: Tensor, targets: list[dict[str, Tensor]]) -> MatchIndices:
        """Args as ``HungarianMatcher.forward``. Returns R tuples ``(query_idx, target_idx)`` (int64, CPU),
        ordered by query then target; lengths vary (0 for negatives and for targets no query reaches)."""
        return match_layers([(self, pred_logits, pred_boxes)], targets)[0]


Matcher = HungarianMatcher | OneToManyMatcher


def match_layers(
    layers: list[tuple[Matcher, Tensor, Tensor]],
    targets: list[dict[str, Tensor]],
    extras: list[Tensor] | None = None,
) -> list[Any]:
    """Match several decoder layers (and query sets) of one batch with ONE device->host copy.

    Args:
        layers: ``(matcher, pred_logits (R,Q), pred_boxes (R,Q,4) xyxy)`` per layer; every matcher's ``prepare``
            runs on the device, the results travel to the host together, then each ``assign`` runs there.
        targets: the R target dicts of the batch (shared by all layers).
        extras: further device tensors the caller needs on the host (e.g. per-instance flags); they ride along in
            the same copy, as float32.
    Returns:
        One ``MatchIndices`` per layer, in order, followed by each of ``extras`` as a float32 NumPy array of its
        shape.
    """
    extras = extras or []
    prepared = [matcher.prepare(logits, boxes, targets) for matcher, logits, boxes in layers]
    parts = prepared + [e.detach().float().flatten() for e in extras]
    if not parts:
        return []
    device = parts[0].device
    host = torch.cat([p.to(device) for p in parts]).cpu().numpy() if sum(p.numel() for p in parts) else np.empty(0)
    results: list[Any] = []
    start = 0
    for (matcher, logits, _), part in zip(layers, prepared, strict=True):
        results.append(matcher.assign(host[start : start + part.numel()], logits.shape[1], targets))
        start += part.numel()
    for extra in extras:
        results.append(host[start : start + extra.numel()].reshape(extra.shape))
        start += extra.numel()
    return results
