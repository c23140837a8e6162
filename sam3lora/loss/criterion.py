"""SAM 3 training criterion: Hungarian matching plus the official loss terms, weights from config.

Design after DETR's ``SetCriterion`` (one method per loss, a weight dict) with SAM 3's terms and numbers
(``sam3/train/loss/loss_fns.py``); every default lives in ``conf/loss/sam3.yaml``.

Inputs follow docs/contracts.md. ``outputs``: ``pred_logits (R,Q)``, ``pred_boxes (R,Q,4)`` normalised
xyxy, ``presence_logits (R,1)``, ``pred_masks (R,Q,h,w)`` logits (or, in training, a ``MaskProduct`` that
forms only the indexed ones), optional ``semantic_seg (R,1,h,w)`` logits
and ``aux_outputs`` (list of dicts with ``pred_logits``, ``pred_boxes``, ``presence_logits``). ``targets``:
R dicts with ``boxes (n,4)`` normalised xyxy, ``masks (n,S,S)`` bool and ``has_mask (n,)`` bool; n == 0 is a
negative prompt.

Reuse of the matching: ``indices = criterion.match(outputs, targets)`` returns the final layer's assignment;
``criterion(outputs, targets, indices=indices)`` then skips its own matching, and the caller can hand the same
indices to the metrics.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from hydra.utils import get_method, instantiate
from torch import Tensor, nn
from torchvision.ops import box_convert, sigmoid_focal_loss

from sam3lora.loss.matcher import HungarianMatcher, Matcher, MatchIndices, OneToManyMatcher, match_layers

ExtraTerm = Callable[[dict[str, Any], list[dict[str, Tensor]], MatchIndices], Tensor]
"""A user loss term: ``(outputs, targets, indices) -> scalar Tensor`` (final layer, final-layer indices)."""

MASK_LOSS_MODES = ("full", "points")
MASK_NORMALIZATIONS = ("boxes", "masks")
SEMANTIC_BOX_ONLY = ("background", "skip_row")
O2M_TERMS = ("loss_bbox", "loss_giou", "loss_ce", "loss_mask", "loss_dice")
"""Terms the one-to-many (DAC) queries are supervised with (no presence: the copy has no presence token)."""


@dataclass
class OneToManySettings:
    """One-to-many (DAC) supervision of the decoder's second query set (official ``o2m_*`` settings).

    Attributes:
        enabled: run the DAC queries during training and add their terms (the model side reads this switch).
        weight: multiplies every o2m term (official ``o2m_weight``).
        matcher: the one-to-many matcher used on the final layer's o2m outputs.
        matcher_on_aux: match the aux layers' o2m outputs one-to-many too; False (official fine-tuning configs,
            ``use_o2m_matcher_on_o2m_aux: false``) matches them with the one-to-one Hungarian matcher.
    """

    enabled: bool
    weight: float
    matcher: OneToManyMatcher
    matcher_on_aux: bool


def _paired_areas(boxes1: Tensor, boxes2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(intersection, union, enclosing-box area) of corresponding xyxy boxes: (N,4), (N,4) -> three (N,)."""
    inter = (torch.min(boxes1[:, 2:], boxes2[:, 2:]) - torch.max(boxes1[:, :2], boxes2[:, :2])).clamp(min=0).prod(-1)
    area1 = (boxes1[:, 2:] - boxes1[:, :2]).clamp(min=0).prod(-1)
    area2 = (boxes2[:, 2:] - boxes2[:, :2]).clamp(min=0).prod(-1)
    hull = (torch.max(boxes1[:, 2:], boxes2[:, 2:]) - torch.min(boxes1[:, :2], boxes2[:, :2])).clamp(min=0).prod(-1)
    return inter, area1 + area2 - inter, hull


def paired_box_iou(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-12) -> Tensor:
    """IoU of corresponding boxes: (N,4) xyxy and (N,4) xyxy -> (N,).

    torchvision only offers the pairwise (N, M) IoU; this is its diagonal without the N x M matrix. ``eps`` only
    guards 0/0: far below float32's resolution of any real box area, so tiny boxes get the official values
    (torchvision's ``generalized_box_iou_loss`` adds 1e-7, which moves the GIoU of a 4-pixel box at 1008 px).
    """
    inter, union, _ = _paired_areas(boxes1, boxes2)
    return inter / (union + eps)


def paired_generalized_box_iou(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-12) -> Tensor:
    """GIoU of corresponding xyxy boxes: (N,4), (N,4) -> (N,), ``IoU - (hull - union) / hull``."""
    inter, union, hull = _paired_areas(boxes1, boxes2)
    return inter / (union + eps) - (hull - union) / (hull + eps)


def point_sample(inputs: Tensor, coords: Tensor, mode: str = "bilinear") -> Tensor:
    """Values of ``inputs (N,C,H,W)`` at ``coords (N,P,2)`` in [0,1] (x, y) -> (N,C,P), via ``grid_sample``.

    ``align_corners=False`` and border padding, so that sampling the low-resolution logits equals sampling
    their ``F.interpolate(mode="bilinear")`` upsampling, borders included.
    """
    grid = 2.0 * coords[:, :, None, :] - 1.0
    return F.grid_sample(inputs, grid, mode=mode, padding_mode="border", align_corners=False)[..., 0]


@torch.no_grad()
def uncertain_point_coords(
    logits: Tensor, num_points: int, oversample_ratio: float, importance_sample_ratio: float
) -> Tensor:
    """Mask2Former / SAM 3 point selection: (N,1,h,w) logits -> (N, num_points, 2) coords in [0,1].

    Draws ``oversample_ratio * num_points`` uniform points, keeps the ``importance_sample_ratio * num_points``
    most uncertain ones (logit closest to 0) and fills up with fresh uniform points. With
    ``importance_sample_ratio = 0`` this is plain uniform sampling.
    """
    n = logits.shape[0]
    num_uncertain = int(importance_sample_ratio * num_points)
    num_random = num_points - num_uncertain
    parts = []
    if num_uncertain > 0:
        num_sampled = max(int(num_points * oversample_ratio), num_uncertain)
        cand = torch.rand(n, num_sampled, 2, device=logits.device)
        uncertainty = -point_sample(logits.float(), cand)[:, 0].abs()
        idx = uncertainty.topk(num_uncertain, dim=1).indices
        parts.append(torch.gather(cand, 1, idx[..., None].expand(-1, -1, 2)))
    if num_random > 0:
        parts.append(torch.rand(n, num_random, 2, device=logits.device))
    return torch.cat(parts, dim=1)


def dice_loss_per_item(logits: Tensor, targets: Tensor) -> Tensor:
    """SAM 3 dice loss with +1 smoothing: (N, P) logits and (N, P) targets in [0,1] -> (N,)."""
    prob = logits.sigmoid()
    num = 2 * (prob * targets).sum(-1)
    den = prob.sum(-1) + targets.sum(-1)
    return 1 - (num + 1) / (den + 1)


def focal_loss_per_item(logits: Tensor, targets: Tensor, alpha: float, gamma: float) -> Tensor:
    """Sigmoid focal loss averaged over points: (N, P) logits and targets -> (N,)."""
    return sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma, reduction="none").mean(-1)


def _zero(ref: Tensor) -> Tensor:
    """A float32 zero that stays attached to ``ref``'s graph (keeps DDP's gradient bookkeeping happy)."""
    return ref.float().sum() * 0.0


def _build_extra_term(name: str, spec: Mapping[str, Any]) -> tuple[ExtraTerm, float]:
    """``{weight: w, fn: <callable | dotted path | {_target_: ..., **kwargs}>}`` -> (callable, weight)."""
    if "weight" not in spec or "fn" not in spec:
        raise ValueError(f"extra term {name!r} needs 'weight' and 'fn', got keys {list(spec)}")
    unknown = set(spec) - {"weight", "fn"}
    if unknown:
        raise ValueError(f"extra term {name!r}: unknown keys {sorted(unknown)}")
    fn = spec["fn"]
    if isinstance(fn, str):
        fn = get_method(fn)
    elif isinstance(fn, Mapping):  # not yet instantiated (e.g. _recursive_: false): bind kwargs lazily
        fn = instantiate(fn, _partial_=fn.get("_partial_", True))
    if not callable(fn):
        raise TypeError(f"extra term {name!r}: fn is not callable ({type(fn).__name__})")
    return fn, float(spec["weight"])


class Sam3Criterion(nn.Module):
    """SAM 3 losses for one batch of (image, prompt) rows.

    Terms (logged keys, weighted): ``loss_bbox``, ``loss_giou``, ``loss_ce``, ``loss_presence`` on the final
    layer and, with ``aux_loss``, on every ``aux_outputs[i]`` (suffix ``_aux{i}``, own matching);
    ``loss_mask``, ``loss_dice``, ``loss_semantic_focal``, ``loss_semantic_dice`` and the extra terms on the
    final layer only. With one-to-many supervision and an ``o2m`` entry in the outputs (training only), the DAC
    queries add ``loss_bbox``, ``loss_giou``, ``loss_ce``, ``loss_mask``, ``loss_dice`` (final layer, suffix
    ``_o2m``) and the box/ce terms of every aux layer (``_aux{i}_o2m``), each times ``o2m.weight``. A term whose
    weight is 0 is neither computed nor logged.

    Normalisation (official by default): box terms by the number of GT boxes; mask terms by the number of GT
    boxes too (``mask_normalization: boxes``; ``masks`` divides by the masked instances only); both averaged over
    processes under DDP and clamped to >= 1; ``loss_ce`` the mean over all R x Q query slots (or the sum over
    ``ce_pad_queries * R`` slots when Q is smaller, as the official ``pad_n_queries``); ``loss_presence`` the
    mean over rows; semantic terms the mean over rows whose mask union is non-empty; the total times sqrt(R)
    with ``scale_by_sqrt_batch``.
    """

    def __init__(
        self,
        matcher: HungarianMatcher,
        *,
        weight_bbox: float,
        weight_giou: float,
        weight_ce: float,
        weight_presence: float,
        weight_mask: float,
        weight_dice: float,
        weight_semantic_focal: float,
        weight_semantic_dice: float,
        ce_pos_weight: float,
        ce_iou_alpha: float,
        ce_neg_gamma: float,
        ce_pad_queries: int | None,
        presence_scale: float,
        mask_focal_alpha: float,
        mask_focal_gamma: float,
        mask_normalization: str,
        semantic_focal_alpha: float,
        semantic_focal_gamma: float,
        semantic_box_only: str,
        mask_loss: str,
        num_points: int,
        oversample_ratio: float,
        importance_sample_ratio: float,
        aux_loss: bool,
        scale_by_sqrt_batch: bool,
        o2m: OneToManySettings | None,
        extra_terms: Mapping[str, Mapping[str, Any]] | None,
    ) -> None:
        super().__init__()
        if mask_loss not in MASK_LOSS_MODES:
            raise ValueError(f"loss.mask_loss must be one of {MASK_LOSS_MODES}, got {mask_loss!r}")
        if mask_loss == "points" and num_points <= 0:
            raise ValueError("loss.num_points must be > 0 with loss.mask_loss=points")
        if not 0.0 <= importance_sample_ratio <= 1.0:
            raise ValueError("loss.importance_sample_ratio must be in [0, 1]")
        if mask_normalization not in MASK_NORMALIZATIONS:
            raise ValueError(f"loss.mask_normalization must be one of {MASK_NORMALIZATIONS}, got "
                             f"{mask_normalization!r}")
        if semantic_box_only not in SEMANTIC_BOX_ONLY:
            raise ValueError(f"loss.semantic_box_only must be one of {SEMANTIC_BOX_ONLY}, got {semantic_box_only!r}")
        if ce_pad_queries is not None and int(ce_pad_queries) < 1:
            raise ValueError(f"loss.ce_pad_queries must be null or >= 1, got {ce_pad_queries}")
        self.matcher = matcher
        self.weight_dict: dict[str, float] = {
            "loss_bbox": float(weight_bbox),
            "loss_giou": float(weight_giou),
            "loss_ce": float(weight_ce),
            "loss_presence": float(weight_presence),
            "loss_mask": float(weight_mask),
            "loss_dice": float(weight_dice),
            "loss_semantic_focal": float(weight_semantic_focal),
            "loss_semantic_dice": float(weight_semantic_dice),
        }
        for key, weight in self.weight_dict.items():
            if not weight >= 0:  # also refuses NaN
                raise ValueError(f"loss.weight_{key.removeprefix('loss_')} must be >= 0, got {weight}")
        self.ce_pos_weight = ce_pos_weight
        self.ce_iou_alpha = ce_iou_alpha
        self.ce_neg_gamma = ce_neg_gamma
        self.ce_pad_queries = None if ce_pad_queries is None else int(ce_pad_queries)
        self.presence_scale = presence_scale
        self.mask_focal_alpha = mask_focal_alpha
        self.mask_focal_gamma = mask_focal_gamma
        self.mask_normalization = mask_normalization
        self.semantic_focal_alpha = semantic_focal_alpha
        self.semantic_focal_gamma = semantic_focal_gamma
        self.semantic_box_only = semantic_box_only
        self.mask_loss = mask_loss
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.aux_loss = aux_loss
        self.scale_by_sqrt_batch = scale_by_sqrt_batch
        if o2m is not None and o2m.enabled and not o2m.weight > 0:
            raise ValueError(f"loss.o2m.weight must be > 0 when loss.o2m.enabled, got {o2m.weight}")
        self.o2m = o2m if o2m is not None and o2m.enabled else None
        self._compiled_dense_terms: Callable[..., tuple[Tensor, Tensor]] | None = None
        self.extra_terms: dict[str, ExtraTerm] = {}
        # Extra terms that are modules are registered so that .to(device) and state_dict see them.
        self.extra_modules = nn.ModuleDict()
        for name, spec in (extra_terms or {}).items():
            if name in self.weight_dict or name == "loss":
                raise ValueError(f"extra term name {name!r} clashes with a built-in key")
            fn, weight = _build_extra_term(name, spec)
            self.extra_terms[name] = fn
            self.weight_dict[name] = weight
            if isinstance(fn, nn.Module):
                self.extra_modules[name] = fn

    @property
    def wants_o2m(self) -> bool:
        """True when the model should run its one-to-many (DAC) queries in training steps."""
        return self.o2m is not None

    # ------------------------------------------------------------------ matching and normalisation
    def match(self, outputs: Mapping[str, Any], targets: list[dict[str, Tensor]]) -> MatchIndices:
        """Final-layer Hungarian matching: R tuples ``(query_idx, target_idx)`` (int64, CPU)."""
        return self.matcher(outputs["pred_logits"], outputs["pred_boxes"], targets)

    @staticmethod
    def has_mask_flags(targets: list[dict[str, Tensor]]) -> Tensor:
        """(N,) bool on the targets' device, N = all instances of the batch in row order: which carry a mask.

        Uses ``has_mask``; a target without it has masks iff it has a ``masks`` entry of length n.
        """
        flags = []
        for t in targets:
            n = len(t["boxes"])
            if "has_mask" in t:
                flags.append(t["has_mask"].bool().reshape(n))
            else:
                has = t.get("masks") is not None and len(t["masks"]) == n
                flags.append(torch.full((n,), has, dtype=torch.bool))
        device = next((f.device for f in flags if f.device.type != "cpu"), torch.device("cpu"))
        return torch.cat([f.to(device) for f in flags]) if flags else torch.zeros(0, dtype=torch.bool)

    @staticmethod
    def _split_rows(flat: np.ndarray, targets: list[dict[str, Tensor]]) -> list[np.ndarray]:
        """Per-instance host values of the batch (N,) -> one (n,) bool array per row."""
        ends = np.cumsum([len(t["boxes"]) for t in targets])[:-1]
        return [part.astype(bool) for part in np.split(flat, ends)] if targets else []

    def num_instances(
        self, targets: list[dict[str, Tensor]], device: torch.device, has_mask: list[np.ndarray] | None = None
    ) -> tuple[Tensor, Tensor]:
        """(num_boxes, num_masks): GT counts of the batch, averaged over DDP processes, clamped to >= 1.

        ``has_mask``: the per-row host flags when the caller already has them (else one device->host copy here).
        """
        if has_mask is None:
            has_mask = self._split_rows(self.has_mask_flags(targets).cpu().numpy(), targets)
        num_masks = sum(int(h.sum()) for h in has_mask)
        counts = torch.tensor([float(sum(len(t["boxes"]) for t in targets)), float(num_masks)], device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts)
            counts = counts / dist.get_world_size()
        counts = counts.clamp(min=1.0)
        return counts[0], counts[1]

    @staticmethod
    def _flat_index(indices: MatchIndices, device: torch.device) -> tuple[Tensor, Tensor]:
        """(row_idx, query_idx) of all matched queries, each (N,) on ``device``."""
        rows = [torch.full_like(q, r) for r, (q, _) in enumerate(indices)]
        return torch.cat(rows).to(device), torch.cat([q for q, _ in indices]).to(device)

    @staticmethod
    def _matched_target_boxes(
        targets: list[dict[str, Tensor]], indices: MatchIndices, device: torch.device
    ) -> Tensor:
        """(N, 4) xyxy GT boxes in the order of ``_flat_index``."""
        boxes = [t["boxes"][tgt.to(t["boxes"].device)] for t, (_, tgt) in zip(targets, indices, strict=True)]
        return torch.cat(boxes).to(device=device, dtype=torch.float32)

    # ------------------------------------------------------------------ loss terms (unweighted)
    def loss_boxes(
        self,
        outputs: Mapping[str, Any],
        targets: list[dict[str, Tensor]],
        indices: MatchIndices,
        num_boxes: Tensor,
    ) -> dict[str, Tensor]:
        """``loss_bbox``: L1 on normalised cxcywh; ``loss_giou``: 1 - GIoU; both summed / num_boxes."""
        pred_boxes = outputs["pred_boxes"]
        rows, queries = self._flat_index(indices, pred_boxes.device)
        if len(rows) == 0:
            return {"loss_bbox": _zero(pred_boxes), "loss_giou": _zero(pred_boxes)}
        src = pred_boxes[rows, queries].float()
        tgt = self._matched_target_boxes(targets, indices, pred_boxes.device)
        l1 = F.l1_loss(
            box_convert(src, "xyxy", "cxcywh"), box_convert(tgt, "xyxy", "cxcywh"), reduction="sum"
        )
        giou = (1 - paired_generalized_box_iou(src, tgt)).sum()
        return {"loss_bbox": l1 / num_boxes, "loss_giou": giou / num_boxes}

    def loss_ce(
        self, outputs: Mapping[str, Any], targets: list[dict[str, Tensor]], indices: MatchIndices
    ) -> Tensor:
        """IoU-aware BCE on ``pred_logits (R,Q)``, mean over all R x Q slots (``ce_pad_queries``: see class doc).

        Matched query: ``pos_weight * BCE(s, t)`` with ``t = clamp(p^a * IoU^(1-a), min=0.01)`` detached
        (``a = ce_iou_alpha``, IoU of the matched boxes). Unmatched: ``BCE(s, 0) * p^ce_neg_gamma``.
        Rows of negative prompts are zeroed (the presence head handles them).
        """
        logits = outputs["pred_logits"].float()
        prob = logits.sigmoid()
        rows, queries = self._flat_index(indices, logits.device)
        is_pos = torch.zeros_like(logits)
        soft_target = torch.zeros_like(logits)
        if len(rows) > 0:
            with torch.no_grad():
                src = outputs["pred_boxes"][rows, queries].float()
                tgt = self._matched_target_boxes(targets, indices, logits.device)
                iou = paired_box_iou(src, tgt)
                t = prob[rows, queries] ** self.ce_iou_alpha * iou ** (1 - self.ce_iou_alpha)
                is_pos[rows, queries] = 1.0
                soft_target[rows, queries] = t.clamp(min=0.01)
        pos = F.binary_cross_entropy_with_logits(logits, soft_target, reduction="none") * self.ce_pos_weight
        neg = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none")
        loss = pos * is_pos + neg * (1 - is_pos) * prob**self.ce_neg_gamma
        keep = torch.tensor([len(t["boxes"]) > 0 for t in targets], device=logits.device, dtype=logits.dtype)
        loss = loss * keep[:, None]
        num_rows, num_queries = logits.shape
        if self.ce_pad_queries is not None and num_queries < self.ce_pad_queries:
            return loss.sum() / (self.ce_pad_queries * num_rows)
        return loss.mean()

    def loss_presence(self, outputs: Mapping[str, Any], targets: list[dict[str, Tensor]]) -> Tensor:
        """``presence_scale * BCE(presence_logits, row has >= 1 instance)``, mean over all rows."""
        logits = outputs["presence_logits"].float().reshape(-1)
        target = torch.tensor([float(len(t["boxes"]) > 0) for t in targets], device=logits.device)
        return self.presence_scale * F.binary_cross_entropy_with_logits(logits, target)

    def _dense_pair(self, pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """Predictions (N,h,w) logits and targets (N,H,W) -> flattened (N,P) logits and targets on P points.

        ``full``: bilinear upsampling of the logits to H x W (P = H*W). ``points``: ``num_points`` points per
        item chosen by ``uncertain_point_coords``, both sides read with ``grid_sample`` (no H x W logits):
        the logits bilinearly, the targets with ``nearest`` so they stay binary as in ``full`` (Mask2Former
        and the official code read targets bilinearly, which softens them along the boundary).
        """
        pred = pred.float()[:, None]
        target = target.to(pred.dtype)[:, None]
        if self.mask_loss == "points":
            coords = uncertain_point_coords(
                pred.detach(), self.num_points, self.oversample_ratio, self.importance_sample_ratio
            )
            return point_sample(pred, coords)[:, 0], point_sample(target, coords, mode="nearest")[:, 0]
        if pred.shape[-2:] != target.shape[-2:]:
            pred = F.interpolate(pred, size=target.shape[-2:], mode="bilinear", align_corners=False)
        return pred.flatten(1), target.flatten(1)

    def _dense_terms(self, pred: Tensor, target: Tensor, alpha: float, gamma: float) -> tuple[Tensor, Tensor]:
        """Per-item focal (mean over points) and Dice of predictions (N,h,w) logits vs targets (N,H,W): two (N,).

        The per-pixel part of the mask and semantic terms, the one ``compile_terms`` compiles.
        """
        logits, target = self._dense_pair(pred, target)
        return focal_loss_per_item(logits, target, alpha, gamma), dice_loss_per_item(logits, target)

    def _mask_terms(self, pred: Tensor, target: Tensor, alpha: float, gamma: float) -> tuple[Tensor, Tensor]:
        """``_dense_terms``, compiled when ``compile_terms`` was given options."""
        terms = self._compiled_dense_terms or self._dense_terms
        return terms(pred, target, alpha, gamma)

    def compile_terms(self, options: Mapping[str, Any] | None) -> None:
        """``torch.compile`` the per-pixel mask terms with ``options`` (``torch.compile`` kwargs); None: eager."""
        self._compiled_dense_terms = None if options is None else torch.compile(self._dense_terms, **options)

    def loss_masks(
        self,
        outputs: Mapping[str, Any],
        targets: list[dict[str, Tensor]],
        indices: MatchIndices,
        num_masks: Tensor,
        has_mask: list[np.ndarray],
    ) -> dict[str, Tensor]:
        """``loss_mask`` (focal, mean over pixels) and ``loss_dice`` of matched queries with a GT mask.

        Each summed over instances / ``num_masks`` (the caller passes the box count under the official
        ``mask_normalization: boxes``). Box-only targets (``has_mask``, per row (n,) host flags, False) are left out.
        """
        pred_masks = outputs["pred_masks"]
        rows, queries, tgt = [], [], []
        for r, (t, (q, j)) in enumerate(zip(targets, indices, strict=True)):
            keep = np.flatnonzero(has_mask[r][j.numpy()])  # host bookkeeping: positions in this row's matches
            if len(keep) == 0:
                continue
            rows.extend([r] * len(keep))
            queries.append(q.numpy()[keep])
            tgt.append(t["masks"][torch.as_tensor(j.numpy()[keep]).to(t["masks"].device)].to(pred_masks.device))
        if not rows:
            return {"loss_mask": _zero(pred_masks), "loss_dice": _zero(pred_masks)}
        # host indices: a MaskProduct groups them by row without a sync (a dense tensor copies them over)
        src = pred_masks[torch.as_tensor(rows), torch.as_tensor(np.concatenate(queries))]
        focal, dice = self._mask_terms(src, torch.cat(tgt), self.mask_focal_alpha, self.mask_focal_gamma)
        return {"loss_mask": focal.sum() / num_masks, "loss_dice": dice.sum() / num_masks}

    @staticmethod
    def semantic_flags(targets: list[dict[str, Tensor]]) -> Tensor:
        """(R,) bool on the device: the union of the row's masked instances has a foreground pixel (no sync)."""
        flags = []
        for t in targets:
            n = len(t["boxes"])
            masks = t.get("masks")
            if n == 0 or masks is None or len(masks) != n:
                flags.append(torch.zeros((), dtype=torch.bool, device=t["boxes"].device))
                continue
            has = t["has_mask"].bool().reshape(n) if "has_mask" in t else torch.ones(n, dtype=torch.bool)
            flags.append((masks.flatten(1).bool().any(1) & has.to(masks.device)).any().to(t["boxes"].device))
        return torch.stack(flags) if flags else torch.zeros(0, dtype=torch.bool)

    def loss_semantic(
        self,
        outputs: Mapping[str, Any],
        targets: list[dict[str, Tensor]],
        has_mask: list[np.ndarray],
        nonempty: np.ndarray,
    ) -> dict[str, Tensor]:
        """``loss_semantic_focal`` and ``loss_semantic_dice``: ``semantic_seg (R,1,h,w)`` vs the union of the
        row's instance masks, mean over the rows whose union is non-empty.

        ``has_mask`` (per row (n,) host flags) and ``nonempty`` ((R,) host flags of ``semantic_flags``) come with
        the step's one device->host copy. ``semantic_box_only: background`` (official): a box-only instance adds
        nothing to the union, so its area is trained as background; the mean is ``sum / (rows + 1e-6)`` as the
        official code. ``skip_row``: rows with any box-only instance are left out (no hole trained as background).
        """
        sem = outputs["semantic_seg"]
        rows, unions = [], []
        for r, (t, has) in enumerate(zip(targets, has_mask, strict=True)):
            if len(has) == 0 or (self.semantic_box_only == "skip_row" and not has.all()) or not nonempty[r]:
                continue
            masked = torch.as_tensor(np.flatnonzero(has)).to(t["masks"].device)
            rows.append(r)
            unions.append(t["masks"][masked].bool().any(0))
        if not rows:
            return {"loss_semantic_focal": _zero(sem), "loss_semantic_dice": _zero(sem)}
        pred = sem[torch.as_tensor(rows, device=sem.device), 0]
        focal, dice = self._mask_terms(
            pred, torch.stack(unions).to(sem.device), self.semantic_focal_alpha, self.semantic_focal_gamma
        )
        count = len(rows) + (1e-6 if self.semantic_box_only == "background" else 0.0)
        return {"loss_semantic_focal": focal.sum() / count, "loss_semantic_dice": dice.sum() / count}

    # ------------------------------------------------------------------ aggregation
    def _wants(self, *keys: str) -> bool:
        return any(self.weight_dict[k] != 0 for k in keys)

    def _layer_terms(
        self,
        outputs: Mapping[str, Any],
        targets: list[dict[str, Tensor]],
        indices: MatchIndices,
        num_boxes: Tensor,
        presence: bool = True,
    ) -> dict[str, Tensor]:
        """Unweighted box, ce and (with ``presence``) presence terms of one decoder layer."""
        terms: dict[str, Tensor] = {}
        if self._wants("loss_bbox", "loss_giou"):
            terms.update(self.loss_boxes(outputs, targets, indices, num_boxes))
        if self._wants("loss_ce"):
            terms["loss_ce"] = self.loss_ce(outputs, targets, indices)
        if presence and self._wants("loss_presence") and outputs.get("presence_logits") is not None:
            terms["loss_presence"] = self.loss_presence(outputs, targets)
        return terms

    def _query_set_terms(
        self,
        out: Mapping[str, Any],
        targets: list[dict[str, Tensor]],
        indices: MatchIndices,
        aux_indices: list[MatchIndices],
        num_boxes: Tensor,
        num_masks: Tensor,
        has_mask: list[np.ndarray],
        *,
        presence: bool,
        scale: float = 1.0,
        suffix: str = "",
    ) -> dict[str, Tensor]:
        """Weighted terms of one query set: the final layer's (box, ce, presence, masks; key + ``suffix``) and,
        with ``aux_loss``, every aux layer's box/ce/presence terms (``_aux{i}`` + ``suffix``, ``aux_indices[i]``)."""
        raw = self._layer_terms(out, targets, indices, num_boxes, presence=presence)
        if self._wants("loss_mask", "loss_dice") and out.get("pred_masks") is not None:
            raw.update(self.loss_masks(out, targets, indices, num_masks, has_mask))
        weighted = {f"{k}{suffix}": v * self.weight_dict[k] * scale for k, v in raw.items() if self.weight_dict[k] != 0}
        for i, (aux, aux_idx) in enumerate(zip(self._aux_layers(out), aux_indices, strict=True)):
            for k, v in self._layer_terms(aux, targets, aux_idx, num_boxes, presence=presence).items():
                if self.weight_dict[k] != 0:
                    weighted[f"{k}_aux{i}{suffix}"] = v * self.weight_dict[k] * scale
        return weighted

    def _aux_layers(self, out: Mapping[str, Any]) -> list[Mapping[str, Any]]:
        """The aux layers of a query set that get terms: all of ``aux_outputs`` with ``aux_loss``, else none."""
        return list(out.get("aux_outputs") or []) if self.aux_loss else []

    def forward(
        self,
        outputs: Mapping[str, Any],
        targets: list[dict[str, Tensor]],
        indices: MatchIndices | None = None,
    ) -> dict[str, Tensor]:
        """Compute every enabled term.

        All matchings of the step (final and aux layers of both query sets) and the host-side bookkeeping (which
        instances have masks, which rows have a non-empty mask union) travel to the host in ONE copy
        (``match_layers``); nothing else in here waits for the device (``tests/test_syncs.py`` counts).

        Args:
            outputs: model outputs (module docstring); ``aux_outputs`` is optional; ``o2m`` (a dict with
                ``pred_logits``, ``pred_boxes``, ``pred_masks``, ``aux_outputs`` of the DAC queries) is present in
                training steps with one-to-many supervision.
            targets: R target dicts (module docstring).
            indices: final-layer matching from ``match``; computed here when None.
        Returns:
            ``loss``: the weighted sum (times sqrt(R) with ``scale_by_sqrt_batch``), with grad; every weighted
            term under its key (``loss_bbox``, ..., ``loss_bbox_aux0``, ..., ``loss_bbox_o2m``, ..., extra term
            names), detached and not scaled by sqrt(R).
        """
        if len(targets) != outputs["pred_logits"].shape[0]:
            raise ValueError(f"{len(targets)} targets for {outputs['pred_logits'].shape[0]} rows")
        o2m_out = outputs.get("o2m") if self.o2m is not None else None
        semantic = self._wants("loss_semantic_focal", "loss_semantic_dice") and outputs.get("semantic_seg") is not None

        # every matching and flag of the step, one device->host copy
        sets: list[tuple[Matcher, Matcher, Mapping[str, Any]]] = [(self.matcher, self.matcher, outputs)]
        if o2m_out is not None:
            aux_matcher = self.o2m.matcher if self.o2m.matcher_on_aux else self.matcher
            sets.append((self.o2m.matcher, aux_matcher, o2m_out))
        layers: list[tuple[Matcher, Tensor, Tensor]] = []
        for k, (final_matcher, aux_matcher, out) in enumerate(sets):
            if k > 0 or indices is None:
                layers.append((final_matcher, out["pred_logits"], out["pred_boxes"]))
            layers += [(aux_matcher, aux["pred_logits"], aux["pred_boxes"]) for aux in self._aux_layers(out)]
        extras = [self.has_mask_flags(targets)] + ([self.semantic_flags(targets)] if semantic else [])
        host = match_layers(layers, targets, extras)
        matched, host_extras = iter(host[: len(layers)]), host[len(layers) :]
        has_mask = self._split_rows(host_extras[0], targets)
        per_set = []
        for k, (_, _, out) in enumerate(sets):
            final = next(matched) if k > 0 or indices is None else indices
            per_set.append((final, [next(matched) for _ in self._aux_layers(out)]))

        device = outputs["pred_logits"].device
        num_boxes, num_masks = self.num_instances(targets, device, has_mask)
        if self.mask_normalization == "boxes":
            num_masks = num_boxes

        indices, aux_indices = per_set[0]
        weighted = self._query_set_terms(
            outputs, targets, indices, aux_indices, num_boxes, num_masks, has_mask, presence=True
        )
        if semantic:
            terms = self.loss_semantic(outputs, targets, has_mask, host_extras[1].astype(bool))
            weighted.update({k: v * self.weight_dict[k] for k, v in terms.items() if self.weight_dict[k] != 0})
        for name, fn in self.extra_terms.items():
            if self.weight_dict[name] != 0:
                weighted[name] = fn(outputs, targets, indices) * self.weight_dict[name]
        if o2m_out is not None:
            # DAC queries: final layer matched one-to-many, aux layers as o2m.matcher_on_aux says; no presence
            o2m_indices, o2m_aux_indices = per_set[1]
            weighted.update(self._query_set_terms(
                o2m_out, targets, o2m_indices, o2m_aux_indices, num_boxes, num_masks, has_mask,
                presence=False, scale=self.o2m.weight, suffix="_o2m",
            ))

        total = torch.stack([v.float().reshape(()) for v in weighted.values()]).sum() if weighted else None
        if total is None:
            total = _zero(outputs["pred_logits"])
        if self.scale_by_sqrt_batch:
            total = total * math.sqrt(len(targets))
        result = {k: v.detach() for k, v in weighted.items()}
        result["loss"] = total
        return result
