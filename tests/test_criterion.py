"""Sam3Criterion: each term against a direct computation, edge cases, switches, extra terms, gradients."""

from __future__ import annotations

import inspect
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf

from sam3lora.loss.criterion import Sam3Criterion

YAML = Path(__file__).resolve().parents[1] / "conf" / "loss" / "sam3.yaml"
BASE_KEYS = ["loss_bbox", "loss_giou", "loss_ce", "loss_presence"]
MASK_KEYS = ["loss_mask", "loss_dice", "loss_semantic_focal", "loss_semantic_dice"]


# hand computations below use the plain per-slot ce mean and an unscaled total (official: ce_pad_queries 200,
# sqrt(R) scaling; both are tested on their own, and against the official code in test_oracle_loss.py)
PLAIN = {"ce_pad_queries": None, "scale_by_sqrt_batch": False}


def make_criterion(**overrides: Any) -> Sam3Criterion:
    cfg = OmegaConf.load(YAML)
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value, merge=False)
    return instantiate(cfg)


def extra_term(outputs: dict, targets: list, indices: list, scale: float = 1.0) -> torch.Tensor:
    """A user term for the plug-in test: scale * mean predicted box area."""
    boxes = outputs["pred_boxes"]
    return scale * ((boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])).mean()


def box_mask(box: list[float], size: int) -> torch.Tensor:
    """(size,size) bool mask of a normalised xyxy box."""
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    x, y = (xs + 0.5) / size, (ys + 0.5) / size
    return (x >= box[0]) & (x <= box[2]) & (y >= box[1]) & (y <= box[3])


def hand_case(requires_grad: bool = False) -> tuple[dict, list[dict], list]:
    """Row 0: two targets matched to queries 0 and 2; row 1: a negative prompt. Q=3, masks 4x4 -> 8x8."""
    gen = torch.Generator().manual_seed(0)
    tgt_boxes = torch.tensor([[0.1, 0.1, 0.5, 0.6], [0.4, 0.3, 0.9, 0.8]])
    outputs = {
        "pred_logits": torch.tensor([[1.0, -2.0, 0.5], [0.3, 2.0, -1.0]]),
        "pred_boxes": torch.tensor(
            [
                [[0.35, 0.25, 0.85, 0.75], [0.0, 0.0, 1.0, 1.0], [0.15, 0.05, 0.55, 0.5]],
                [[0.1, 0.1, 0.2, 0.2], [0.3, 0.3, 0.6, 0.6], [0.5, 0.5, 0.9, 0.7]],
            ]
        ),
        "presence_logits": torch.tensor([[1.5], [0.5]]),
        "pred_masks": torch.randn(2, 3, 4, 4, generator=gen) * 2,
        "semantic_seg": torch.randn(2, 1, 4, 4, generator=gen) * 2,
    }
    if requires_grad:
        outputs = {k: v.clone().requires_grad_(True) for k, v in outputs.items()}
    masks = torch.stack([box_mask(b, 8) for b in tgt_boxes.tolist()])
    targets = [
        {"boxes": tgt_boxes, "masks": masks, "has_mask": torch.tensor([True, True])},
        {
            "boxes": torch.zeros(0, 4),
            "masks": torch.zeros(0, 8, 8, dtype=torch.bool),
            "has_mask": torch.zeros(0, dtype=torch.bool),
        },
    ]
    indices = [(torch.tensor([0, 2]), torch.tensor([1, 0])), (torch.zeros(0, dtype=torch.long),) * 2]
    return outputs, targets, indices


def cxcywh(b: list[float]) -> list[float]:
    return [(b[0] + b[2]) / 2, (b[1] + b[3]) / 2, b[2] - b[0], b[3] - b[1]]


def iou_giou(a: list[float], b: list[float]) -> tuple[float, float]:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return inter / union, inter / union - (hull - union) / hull


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def focal_direct(logits: torch.Tensor, target: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    """Elementwise focal loss written from the RetinaNet formula."""
    p = torch.sigmoid(logits)
    p_t = torch.where(target > 0.5, p, 1 - p)
    a_t = torch.where(target > 0.5, torch.full_like(p, alpha), torch.full_like(p, 1 - alpha))
    return -a_t * (1 - p_t) ** gamma * torch.log(p_t)


def dice_direct(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    p = torch.sigmoid(logits).flatten()
    t = target.flatten()
    return 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)


def test_every_yaml_key_is_a_constructor_argument() -> None:
    cfg = OmegaConf.to_container(OmegaConf.load(YAML))
    params = set(inspect.signature(Sam3Criterion.__init__).parameters) - {"self"}
    assert set(cfg) - {"_target_"} == params
    crit = make_criterion()
    assert crit.weight_dict["loss_mask"] == 200.0 and crit.weight_dict["loss_ce"] == 20.0


def test_terms_match_direct_computation() -> None:
    outputs, targets, indices = hand_case()
    crit = make_criterion(aux_loss=False, **PLAIN)
    out = crit(outputs, targets, indices=indices)
    logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
    tgt = targets[0]["boxes"].tolist()
    pairs = [(0, 1), (2, 0)]  # (query, target) in row 0
    num_boxes = 2

    l1 = sum(
        abs(a - b)
        for q, t in pairs
        for a, b in zip(cxcywh(boxes[0, q].tolist()), cxcywh(tgt[t]), strict=True)
    )
    assert out["loss_bbox"].item() == pytest.approx(5 * l1 / num_boxes, rel=1e-5)
    giou = sum(1 - iou_giou(boxes[0, q].tolist(), tgt[t])[1] for q, t in pairs)
    assert out["loss_giou"].item() == pytest.approx(2 * giou / num_boxes, rel=1e-5)

    ce = 0.0
    for q in range(3):  # row 1 is a negative prompt: contributes 0 but counts in the mean
        p = sig(logits[0, q].item())
        match = [t for qq, t in pairs if qq == q]
        if match:
            iou = iou_giou(boxes[0, q].tolist(), tgt[match[0]])[0]
            soft = max(p**0.25 * iou**0.75, 0.01)
            ce += 10 * -(soft * math.log(p) + (1 - soft) * math.log(1 - p))
        else:
            ce += -math.log(1 - p) * p**2
    assert out["loss_ce"].item() == pytest.approx(20 * ce / 6, rel=1e-5)

    pres = [sig(1.5), sig(0.5)]
    bce = (-math.log(pres[0]) - math.log(1 - pres[1])) / 2
    assert out["loss_presence"].item() == pytest.approx(20 * 0.5 * bce, rel=1e-5)

    up = F.interpolate(outputs["pred_masks"][0][None], size=(8, 8), mode="bilinear", align_corners=False)[0]
    masks = targets[0]["masks"].float()
    focal = sum(focal_direct(up[q], masks[t], 0.25, 2.0).mean() for q, t in pairs)
    dice = sum(dice_direct(up[q], masks[t]) for q, t in pairs)
    assert out["loss_mask"].item() == pytest.approx(200 * focal.item() / 2, rel=1e-5)
    assert out["loss_dice"].item() == pytest.approx(10 * dice.item() / 2, rel=1e-5)

    sem = F.interpolate(outputs["semantic_seg"][0:1], size=(8, 8), mode="bilinear", align_corners=False)[0, 0]
    union = masks.amax(0)
    assert out["loss_semantic_focal"].item() == pytest.approx(
        20 * focal_direct(sem, union, 0.6, 2.0).mean().item(), rel=1e-5
    )
    assert out["loss_semantic_dice"].item() == pytest.approx(30 * dice_direct(sem, union).item(), rel=1e-5)

    terms = BASE_KEYS + MASK_KEYS
    assert set(out) == set(terms) | {"loss"}
    assert out["loss"].item() == pytest.approx(sum(out[k].item() for k in terms), rel=1e-6)


def test_forward_matches_itself_and_match_is_exposed() -> None:
    outputs, targets, _ = hand_case()
    crit = make_criterion()
    indices = crit.match(outputs, targets)
    assert len(indices[0][0]) == 2 and len(indices[1][0]) == 0
    a, b = crit(outputs, targets), crit(outputs, targets, indices=indices)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_perfect_predictions_give_near_zero_box_and_mask_terms() -> None:
    tgt_boxes = torch.tensor([[0.1, 0.1, 0.5, 0.6], [0.4, 0.3, 0.9, 0.8]])
    masks = torch.stack([box_mask(b, 16) for b in tgt_boxes.tolist()])
    pred_masks = torch.full((1, 3, 16, 16), -30.0)
    pred_masks[0, 0][masks[1]] = 30.0
    pred_masks[0, 2][masks[0]] = 30.0
    boxes = torch.tensor([[[0.4, 0.3, 0.9, 0.8], [0.0, 0.0, 0.1, 0.1], [0.1, 0.1, 0.5, 0.6]]])
    outputs = {
        "pred_logits": torch.tensor([[12.0, -12.0, 12.0]]),
        "pred_boxes": boxes,
        "presence_logits": torch.tensor([[12.0]]),
        "pred_masks": pred_masks,
        "semantic_seg": torch.where(masks.any(0), 30.0, -30.0)[None, None],
    }
    targets = [{"boxes": tgt_boxes, "masks": masks, "has_mask": torch.tensor([True, True])}]
    out = make_criterion()(outputs, targets)
    for key in ["loss_bbox", "loss_giou", *MASK_KEYS]:
        assert out[key].item() < 1e-4, key
    assert out["loss_presence"].item() < 1e-3
    assert out["loss_ce"].item() < 1e-2


def test_negatives_zero_classification_nonzero_presence() -> None:
    gen = torch.Generator().manual_seed(3)
    outputs = {
        "pred_logits": (torch.randn(2, 5, generator=gen) * 3).requires_grad_(True),
        "pred_boxes": torch.rand(2, 5, 4, generator=gen).sort(-1).values.requires_grad_(True),
        "presence_logits": torch.zeros(2, 1, requires_grad=True),
        "pred_masks": torch.randn(2, 5, 4, 4, generator=gen, requires_grad=True),
    }
    empty = {
        "boxes": torch.zeros(0, 4),
        "masks": torch.zeros(0, 8, 8, dtype=torch.bool),
        "has_mask": torch.zeros(0, dtype=torch.bool),
    }
    out = make_criterion()(outputs, [empty, empty])
    assert out["loss_ce"].item() == 0.0
    assert out["loss_presence"].item() == pytest.approx(20 * 0.5 * math.log(2), rel=1e-5)
    assert out["loss_bbox"].item() == 0.0 and out["loss_mask"].item() == 0.0
    out["loss"].backward()
    assert outputs["presence_logits"].grad.abs().sum() > 0
    assert outputs["pred_masks"].grad is not None  # zero terms stay attached (DDP)


def test_negative_row_logits_do_not_change_ce() -> None:
    outputs, targets, indices = hand_case()
    crit = make_criterion(aux_loss=False)
    before = crit(outputs, targets, indices=indices)["loss_ce"]
    outputs["pred_logits"] = outputs["pred_logits"].clone()
    outputs["pred_logits"][1] = torch.tensor([5.0, -5.0, 9.0])
    assert torch.equal(crit(outputs, targets, indices=indices)["loss_ce"], before)


def test_box_only_targets_skip_masks() -> None:
    outputs, targets, indices = hand_case()
    crit = make_criterion(aux_loss=False, mask_normalization="masks", semantic_box_only="skip_row")
    targets[0]["has_mask"] = torch.tensor([True, False])
    out = crit(outputs, targets, indices=indices)
    garbage = [dict(t) for t in targets]
    garbage[0]["masks"] = targets[0]["masks"].clone()
    garbage[0]["masks"][1] = ~garbage[0]["masks"][1]
    out2 = crit(outputs, garbage, indices=indices)
    assert torch.equal(out["loss_mask"], out2["loss_mask"]) and torch.equal(
        out["loss_dice"], out2["loss_dice"]
    )
    # only query 2 <-> target 0 carries a mask; normalised by one mask
    up = F.interpolate(
        outputs["pred_masks"][0, 2:3][None], size=(8, 8), mode="bilinear", align_corners=False
    )[0, 0]
    expected = focal_direct(up, targets[0]["masks"][0].float(), 0.25, 2.0).mean()
    assert out["loss_mask"].item() == pytest.approx(200 * expected.item(), rel=1e-5)
    # boxes still trained on both targets; the semantic union is skipped for the partially masked row
    assert out["loss_bbox"].item() > 0
    assert out["loss_semantic_focal"].item() == 0.0 and out["loss_semantic_dice"].item() == 0.0


def test_box_only_targets_official_normalisation() -> None:
    """Official: mask terms / number of boxes; the row keeps its semantic terms, the box-only area as background."""
    outputs, targets, indices = hand_case()
    targets[0]["has_mask"] = torch.tensor([True, False])
    official = make_criterion(aux_loss=False)(outputs, targets, indices=indices)
    by_masks = make_criterion(aux_loss=False, mask_normalization="masks")(outputs, targets, indices=indices)
    assert official["loss_mask"].item() == pytest.approx(by_masks["loss_mask"].item() / 2, rel=1e-6)
    assert official["loss_dice"].item() == pytest.approx(by_masks["loss_dice"].item() / 2, rel=1e-6)
    up = F.interpolate(outputs["semantic_seg"][0:1], size=(8, 8), mode="bilinear", align_corners=False)[0, 0]
    union = targets[0]["masks"][0].float()  # only the masked instance: the box-only one's area is background
    expected = focal_direct(up, union, 0.6, 2.0).mean() / (1 + 1e-6)
    assert official["loss_semantic_focal"].item() == pytest.approx(20 * expected.item(), rel=1e-5)
    assert official["loss_semantic_dice"].item() > 0


def test_ce_pad_queries_sums_over_padded_slots() -> None:
    outputs, targets, indices = hand_case()  # Q = 3
    mean = make_criterion(aux_loss=False, ce_pad_queries=None)(outputs, targets, indices=indices)["loss_ce"]
    padded = make_criterion(aux_loss=False, ce_pad_queries=200)(outputs, targets, indices=indices)["loss_ce"]
    assert padded.item() == pytest.approx(mean.item() * 3 / 200, rel=1e-6)
    small = make_criterion(aux_loss=False, ce_pad_queries=2)(outputs, targets, indices=indices)["loss_ce"]
    assert torch.equal(small, mean)  # Q >= ce_pad_queries: the plain mean


def test_weight_zero_and_missing_semantic_skip_terms() -> None:
    outputs, targets, indices = hand_case()
    del outputs["semantic_seg"]
    out = make_criterion(weight_mask=0.0, aux_loss=False)(outputs, targets, indices=indices)
    assert "loss_mask" not in out and "loss_semantic_focal" not in out and "loss_dice" in out


def test_aux_terms_follow_switch() -> None:
    outputs, targets, _ = hand_case()
    aux = {k: outputs[k].clone() for k in ["pred_logits", "pred_boxes", "presence_logits"]}
    outputs["aux_outputs"] = [aux, {k: v + 0.1 for k, v in aux.items()}]
    with_aux = make_criterion(aux_loss=True, **PLAIN)(outputs, targets)
    without = make_criterion(aux_loss=False, **PLAIN)(outputs, targets)
    for i in range(2):
        for k in BASE_KEYS:
            assert f"{k}_aux{i}" in with_aux
    assert not any("_aux" in k for k in without)
    for k in BASE_KEYS:  # identical layer -> identical terms
        assert with_aux[f"{k}_aux0"].item() == pytest.approx(with_aux[k].item(), rel=1e-6)
    extra = sum(with_aux[k].item() for k in with_aux if "_aux" in k)
    assert with_aux["loss"].item() == pytest.approx(without["loss"].item() + extra, rel=1e-5)


def test_extra_term_plugs_in_through_config() -> None:
    outputs, targets, indices = hand_case()
    spec = {"weight": 3.0, "fn": {"_target_": f"{__name__}.extra_term", "_partial_": True, "scale": 2.0}}
    crit = make_criterion(aux_loss=False, extra_terms={"loss_area": spec}, **PLAIN)
    base = make_criterion(aux_loss=False, **PLAIN)(outputs, targets, indices=indices)
    out = crit(outputs, targets, indices=indices)
    expected = 3.0 * extra_term(outputs, targets, indices, scale=2.0).item()
    assert out["loss_area"].item() == pytest.approx(expected, rel=1e-6)
    assert out["loss"].item() == pytest.approx(base["loss"].item() + expected, rel=1e-6)
    by_path = Sam3Criterion(
        crit.matcher, **_kwargs(extra_terms={"loss_area": {"weight": 1.0, "fn": f"{__name__}.extra_term"}})
    )
    assert by_path(outputs, targets, indices=indices)["loss_area"].item() == pytest.approx(
        expected / 6, rel=1e-6
    )
    with pytest.raises(ValueError, match="clashes"):
        Sam3Criterion(crit.matcher, **_kwargs(extra_terms={"loss_ce": {"weight": 1.0, "fn": extra_term}}))


def _kwargs(**overrides: Any) -> dict[str, Any]:
    cfg = OmegaConf.to_container(OmegaConf.load(YAML))
    cfg.pop("_target_")
    cfg.pop("matcher")
    cfg["o2m"] = instantiate(cfg["o2m"])
    cfg.update(overrides)
    return cfg


def test_gradients_flow_to_inputs() -> None:
    outputs, targets, _ = hand_case(requires_grad=True)
    aux = {
        k: outputs[k].detach().clone().requires_grad_(True)
        for k in ["pred_logits", "pred_boxes", "presence_logits"]
    }
    outputs["aux_outputs"] = [aux]
    make_criterion()(outputs, targets)["loss"].backward()
    for name, tensor in [*outputs.items(), *(("aux_" + k, v) for k, v in aux.items())]:
        if name == "aux_outputs":
            continue
        assert tensor.grad is not None and torch.isfinite(tensor.grad).all(), name
        assert tensor.grad.abs().sum() > 0, name


def test_scale_by_sqrt_batch() -> None:
    outputs, targets, indices = hand_case()
    plain = make_criterion(scale_by_sqrt_batch=False)(outputs, targets, indices=indices)
    scaled = make_criterion(scale_by_sqrt_batch=True)(outputs, targets, indices=indices)
    assert scaled["loss"].item() == pytest.approx(math.sqrt(2) * plain["loss"].item(), rel=1e-6)
    assert torch.equal(scaled["loss_ce"], plain["loss_ce"])


def smooth_case() -> tuple[dict, list[dict]]:
    """Smooth logits (a soft disc at 16x16) against a disc mask at 64x64."""

    def disc(size: int, r: float, sharp: float) -> torch.Tensor:
        ys, xs = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
        return sharp * (r - ((xs - 0.5) ** 2 + (ys - 0.45) ** 2).sqrt())

    masks = (disc(64, 0.3, 1.0) > 0)[None]
    outputs = {
        "pred_logits": torch.tensor([[3.0, -3.0]]),
        "pred_boxes": torch.tensor([[[0.2, 0.15, 0.8, 0.75], [0.0, 0.0, 0.2, 0.2]]]),
        "presence_logits": torch.tensor([[2.0]]),
        "pred_masks": torch.stack([disc(16, 0.25, 12.0), disc(16, 0.1, 5.0)])[None].requires_grad_(True),
        "semantic_seg": disc(16, 0.28, 8.0)[None, None],
    }
    targets = [
        {"boxes": torch.tensor([[0.2, 0.15, 0.8, 0.75]]), "masks": masks, "has_mask": torch.tensor([True])}
    ]
    return outputs, targets


def test_points_mode_close_to_full_mode() -> None:
    outputs, targets = smooth_case()
    torch.manual_seed(0)
    full = make_criterion(mask_loss="full")(outputs, targets)
    points = make_criterion(mask_loss="points", num_points=20000, importance_sample_ratio=0.0)(
        outputs, targets
    )
    for key in MASK_KEYS:
        assert points[key].item() == pytest.approx(full[key].item(), rel=0.05), key
    importance = make_criterion(mask_loss="points", num_points=2000)(outputs, targets)
    importance["loss"].backward()
    assert torch.isfinite(importance["loss"]) and outputs["pred_masks"].grad.abs().sum() > 0


def test_num_instances_under_single_process_group(tmp_path: Path) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        _, targets, _ = hand_case()
        targets[0]["has_mask"] = torch.tensor([True, False])
        num_boxes, num_masks = make_criterion().num_instances(targets, torch.device("cpu"))
        assert (num_boxes.item(), num_masks.item()) == (2.0, 1.0)
    finally:
        dist.destroy_process_group()


def test_invalid_options_rejected() -> None:
    matcher = make_criterion().matcher
    with pytest.raises(ValueError, match="loss.weight_giou must be >= 0"):
        Sam3Criterion(matcher, **_kwargs(weight_giou=-1.0))
    with pytest.raises(ValueError, match="loss.mask_normalization"):
        Sam3Criterion(matcher, **_kwargs(mask_normalization="pixels"))
    with pytest.raises(ValueError, match="loss.semantic_box_only"):
        Sam3Criterion(matcher, **_kwargs(semantic_box_only="drop"))
    with pytest.raises(Exception, match="loss.o2m.weight"):  # Hydra wraps it; the app names the key once more
        make_criterion(**{"o2m.weight": -2.0})
    with pytest.raises(Exception, match="loss.o2m.matcher.topk"):
        make_criterion(**{"o2m.matcher.topk": 0})
    with pytest.raises(ValueError, match="mask_loss"):
        Sam3Criterion(matcher, **_kwargs(mask_loss="sampled"))
    with pytest.raises(ValueError, match="weight"):
        Sam3Criterion(matcher, **_kwargs(extra_terms={"loss_x": {"fn": extra_term}}))
