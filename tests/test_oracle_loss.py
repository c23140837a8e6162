"""Our criterion and matchers against Meta's official SAM 3 training code, fed identical random tensors.

The official side is ``Sam3LossWrapper`` built exactly as the official fine-tuning config builds it
(``sam3/train/configs/roboflow_v100/roboflow_v100_full_ft_100_images.yaml``, with its segmentation variant:
``Masks`` and ``SemanticSegCriterion``), ``BinaryHungarianMatcherV2`` for the one-to-one indices (which the
official model computes for the final and every aux layer) and ``BinaryOneToManyMatcher`` for the DAC queries.
Ours is ``Sam3Criterion`` from ``conf/loss/sam3.yaml`` as shipped. Every weighted term, the total and the
gradients of the total with respect to every input agree to 1e-4 relative, with DAC on and off.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from sam3_oracle import load_official
from torchvision.ops import box_convert

YAML = Path(__file__).resolve().parents[1] / "conf" / "loss" / "sam3.yaml"
WEIGHTS = {"loss_bbox": 5.0, "loss_giou": 2.0, "loss_ce": 20.0, "presence_loss": 20.0, "loss_mask": 200.0,
           "loss_dice": 10.0, "loss_semantic_seg": 20.0, "loss_semantic_dice": 30.0}
OUR_NAME = {"presence_loss": "loss_presence", "loss_semantic_seg": "loss_semantic_focal"}
MASK, TARGET = 8, 16  # predicted mask logits 8x8, ground-truth masks 16x16 (upsampled as in training)


@pytest.fixture(scope="module", autouse=True)
def one_process_group(tmp_path_factory: pytest.TempPathFactory):
    """The official loss normalises "globally" (all_reduce of the box count): a 1-process gloo group."""
    import torch.distributed as dist

    path = tmp_path_factory.mktemp("pg") / "store"
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def official():
    return load_official()


def official_wrapper(official, dac: bool) -> Any:
    lf, matcher = official.loss_fns, official.matcher
    return official.sam3_loss.Sam3LossWrapper(
        loss_fns_find=[
            lf.Boxes(weight_dict={"loss_bbox": 5.0, "loss_giou": 2.0}),
            lf.IABCEMdetr(weak_loss=False, weight_dict={"loss_ce": 20.0, "presence_loss": 20.0}, pos_weight=10.0,
                          alpha=0.25, gamma=2, use_presence=True, pos_focal=False, pad_n_queries=200,
                          pad_scale_pos=1.0),
            lf.Masks(focal_alpha=0.25, focal_gamma=2.0, weight_dict={"loss_mask": 200.0, "loss_dice": 10.0},
                     compute_aux=False),
        ],
        matcher=official_o2o_matcher(official),
        o2m_matcher=matcher.BinaryOneToManyMatcher(alpha=0.3, threshold=0.4, topk=4) if dac else None,
        o2m_weight=2.0,
        use_o2m_matcher_on_o2m_aux=False,
        loss_fn_semantic_seg=lf.SemanticSegCriterion(
            presence_head=True, presence_loss=False, focal=True, focal_alpha=0.6, focal_gamma=2.0, downsample=False,
            weight_dict={"loss_semantic_seg": 20.0, "loss_semantic_presence": 1.0, "loss_semantic_dice": 30.0},
        ),
        scale_by_find_batch_size=True,
    )


def official_o2o_matcher(official) -> Any:
    return official.matcher.BinaryHungarianMatcherV2(
        focal=True, cost_class=2.0, cost_bbox=5.0, cost_giou=2.0, alpha=0.25, gamma=2, stable=False
    )


def our_criterion(dac: bool, **overrides: Any):
    cfg = OmegaConf.load(YAML)
    cfg.o2m.enabled = dac
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value, merge=False)
    return instantiate(cfg)


def random_case(seed: int, sizes: tuple[int, ...] = (3, 0, 2, 1, 0), queries: int = 12, layers: int = 3) -> dict:
    """Leaf tensors of one batch: R = len(sizes) rows (0 = negative prompt), a tiny box, a box-only instance.

    Some queries sit near the targets with high scores, so that both matchers assign several of them.
    """
    g = torch.Generator().manual_seed(seed)
    rows = len(sizes)

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=g)

    def boxes(n: int) -> torch.Tensor:  # cxcywh inside the image
        wh = rand(n, 2) * 0.45 + 0.05
        return torch.cat([wh / 2 + rand(n, 2) * (1 - wh), wh], -1)

    targets = []
    for r, n in enumerate(sizes):
        b = boxes(n)
        if r == 0 and n > 1:
            b[1, 2:] = 0.004  # a tiny box
        xyxy = box_convert(b, "cxcywh", "xyxy")
        ys, xs = torch.meshgrid(torch.arange(TARGET), torch.arange(TARGET), indexing="ij")
        x, y = (xs + 0.5) / TARGET, (ys + 0.5) / TARGET
        inside = [(x >= e[0]) & (x <= e[2]) & (y >= e[1]) & (y <= e[3]) for e in xyxy.tolist()]
        masks = torch.stack([m & (rand(TARGET, TARGET) > 0.2) for m in inside]) if n else torch.zeros(0, TARGET, TARGET)
        has_mask = torch.ones(n, dtype=torch.bool)
        if r == 2 and n > 0:
            has_mask[0] = False  # a box-only instance (its mask is empty, as the official data leaves it)
            masks[0] = False
        targets.append({"cxcywh": b, "masks": masks.bool(), "has_mask": has_mask})

    def pred_boxes() -> torch.Tensor:
        out = boxes(layers * rows * queries).view(layers, rows, queries, 4)
        for r, t in enumerate(targets):
            for j, box in enumerate(t["cxcywh"]):
                for q in (2 * j, 2 * j + 1):  # two queries near each target
                    out[:, r, q] = (box + (rand(layers, 4) - 0.5) * 0.04).clamp(0.01, 0.99)
        return out

    def logits() -> torch.Tensor:
        out = torch.randn(layers, rows, queries, generator=g) * 2
        out[:, :, :6] += 2.0
        return out

    case = {
        "logits": logits(), "boxes": pred_boxes(), "presence": torch.randn(layers, rows, 1, generator=g) * 2,
        "masks": torch.randn(rows, queries, MASK, MASK, generator=g) * 3,
        "semantic": torch.randn(rows, 1, MASK, MASK, generator=g) * 3,
        "o2m_logits": logits(), "o2m_boxes": pred_boxes(),
        "o2m_masks": torch.randn(rows, queries, MASK, MASK, generator=g) * 3,
    }
    case = {k: v.requires_grad_(True) for k, v in case.items()}
    case["targets"] = targets
    return case


def ours_inputs(case: dict, dac: bool) -> tuple[dict, list[dict]]:
    xyxy = lambda b: box_convert(b, "cxcywh", "xyxy")  # noqa: E731
    layers = case["logits"].shape[0]
    outputs = {
        "pred_logits": case["logits"][-1], "pred_boxes": xyxy(case["boxes"][-1]),
        "presence_logits": case["presence"][-1], "pred_masks": case["masks"], "semantic_seg": case["semantic"],
        "aux_outputs": [
            {"pred_logits": case["logits"][i], "pred_boxes": xyxy(case["boxes"][i]),
             "presence_logits": case["presence"][i]}
            for i in range(layers - 1)
        ],
    }
    if dac:
        outputs["o2m"] = {
            "pred_logits": case["o2m_logits"][-1], "pred_boxes": xyxy(case["o2m_boxes"][-1]),
            "pred_masks": case["o2m_masks"],
            "aux_outputs": [
                {"pred_logits": case["o2m_logits"][i], "pred_boxes": xyxy(case["o2m_boxes"][i])}
                for i in range(layers - 1)
            ],
        }
    targets = [{"boxes": xyxy(t["cxcywh"]), "masks": t["masks"], "has_mask": t["has_mask"]} for t in case["targets"]]
    return outputs, targets


def official_targets(case: dict) -> dict:
    ts = case["targets"]
    num = torch.tensor([len(t["cxcywh"]) for t in ts])
    boxes = torch.cat([t["cxcywh"] for t in ts])
    padded = torch.zeros(len(ts), max(int(num.max()), 1), 4)
    ids = torch.full((len(ts), padded.shape[1]), -1)
    for r, t in enumerate(ts):
        padded[r, : len(t["cxcywh"])] = t["cxcywh"]
        ids[r, : len(t["cxcywh"])] = torch.arange(len(t["cxcywh"]))
    return {
        "boxes": boxes, "boxes_xyxy": box_convert(boxes, "cxcywh", "xyxy"), "boxes_padded": padded,
        "num_boxes": num, "masks": torch.cat([t["masks"] for t in ts]),
        "is_valid_mask": torch.cat([t["has_mask"] for t in ts]), "is_exhaustive": torch.ones(len(ts), dtype=torch.bool),
        "object_ids_padded": ids, "semantic_masks": None,
    }


def official_outputs(case: dict, dac: bool, official) -> dict:
    xyxy = lambda b: box_convert(b, "cxcywh", "xyxy")  # noqa: E731
    layers = case["logits"].shape[0]

    def layer(i: int) -> dict:
        out = {"pred_logits": case["logits"][i][..., None], "pred_boxes": case["boxes"][i],
               "pred_boxes_xyxy": xyxy(case["boxes"][i]), "presence_logit_dec": case["presence"][i]}
        if dac:
            out.update({"pred_logits_o2m": case["o2m_logits"][i][..., None], "pred_boxes_o2m": case["o2m_boxes"][i],
                        "pred_boxes_xyxy_o2m": xyxy(case["o2m_boxes"][i])})
        return out

    out = layer(layers - 1)
    out.update({"pred_masks": case["masks"], "semantic_seg": case["semantic"], "presence_logit": case["presence"][-1]})
    if dac:
        out["pred_masks_o2m"] = case["o2m_masks"]
    out["aux_outputs"] = [layer(i) for i in range(layers - 1)]
    targets = official_targets(case)
    matcher = official_o2o_matcher(official)
    for o in [out, *out["aux_outputs"]]:  # the official model computes the one-to-one indices itself
        o["indices"] = matcher(o, targets)
    return out


def our_key(key: str) -> str:
    """Official logged key -> ours: presence_loss -> loss_presence, _aux_0 -> _aux0, loss_semantic_seg -> _focal."""
    suffix = ""
    for tail in ("_o2m",):
        if key.endswith(tail):
            key, suffix = key[: -len(tail)], tail
    if "_aux_" in key:
        key, layer = key.rsplit("_aux_", 1)
        suffix = f"_aux{layer}{suffix}"
    return OUR_NAME.get(key, key) + suffix


def base_name(key: str) -> str:
    return key.split("_aux_")[0].removesuffix("_o2m")


@pytest.mark.parametrize("dac", [True, False], ids=["dac", "no_dac"])
@pytest.mark.parametrize("seed", [0, 1])
def test_every_term_total_and_gradient_equal_the_official_loss(official, dac: bool, seed: int) -> None:
    case = random_case(seed)
    theirs = official_wrapper(official, dac)(
        official.model_misc.SAM3Output([[official_outputs(case, dac, official)]]), [official_targets(case)]
    )
    outputs, targets = ours_inputs(case, dac)
    ours = our_criterion(dac)(outputs, targets)

    compared = set()
    for key, value in theirs.items():
        name = base_name(key)
        if name not in WEIGHTS:
            continue  # accuracies, f1, miou: logged, not trained
        expected = float(value) * WEIGHTS[name]
        if name == "presence_loss" and key.endswith("_o2m"):
            assert expected == 0.0  # the DAC copy has no presence token
            continue
        mine = our_key(key)
        assert mine in ours, (key, sorted(ours))
        assert ours[mine].item() == pytest.approx(expected, rel=1e-4, abs=1e-6), key
        compared.add(mine)
    assert compared == set(ours) - {"loss"}  # nothing of ours is missing on the official side
    assert any(k.endswith("_o2m") for k in compared) == dac
    assert ours["loss"].item() == pytest.approx(float(theirs["core_loss"]), rel=1e-4)

    leaves = [k for k, v in case.items() if isinstance(v, torch.Tensor) and (dac or not k.startswith("o2m"))]
    ours_grads = torch.autograd.grad(ours["loss"], [case[k] for k in leaves], allow_unused=True)
    their_grads = torch.autograd.grad(theirs["core_loss"], [case[k] for k in leaves], allow_unused=True)
    for key, mine, their in zip(leaves, ours_grads, their_grads, strict=True):
        assert (mine is None) == (their is None), key
        if mine is not None:
            scale = their.abs().max().item()
            torch.testing.assert_close(mine, their, rtol=1e-4, atol=1e-4 * scale + 1e-7, msg=key)


def test_all_negative_batch_equals_the_official_loss(official) -> None:
    case = random_case(3, sizes=(0, 0, 0))
    theirs = official_wrapper(official, True)(
        official.model_misc.SAM3Output([[official_outputs(case, True, official)]]), [official_targets(case)]
    )
    outputs, targets = ours_inputs(case, True)
    ours = our_criterion(True)(outputs, targets)
    assert ours["loss"].item() == pytest.approx(float(theirs["core_loss"]), rel=1e-4)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matchers_assign_as_the_official_ones(official, seed: int) -> None:
    case = random_case(seed)
    outputs, targets = ours_inputs(case, True)
    off_out = official_outputs(case, True, official)
    off_targets = official_targets(case)
    offsets = torch.cumsum(off_targets["num_boxes"], 0) - off_targets["num_boxes"]

    def pairs(indices: list) -> set[tuple[int, int, int]]:
        return {(r, int(q), int(t)) for r, (qs, ts) in enumerate(indices) for q, t in zip(qs, ts, strict=True)}

    def official_pairs(batch_idx, src_idx, tgt_idx) -> set[tuple[int, int, int]]:
        if tgt_idx is None:  # sources come ordered by target within each row
            tgt_idx = torch.cat([torch.arange(int(n)) for n in off_targets["num_boxes"]])
            return {(int(b), int(s), int(t)) for b, s, t in zip(batch_idx, src_idx, tgt_idx, strict=True)}
        return {(int(b), int(s), int(t - offsets[b])) for b, s, t in zip(batch_idx, src_idx, tgt_idx, strict=True)}

    crit = our_criterion(True)
    hungarian = pairs(crit.matcher(outputs["pred_logits"], outputs["pred_boxes"], targets))
    assert hungarian == official_pairs(*off_out["indices"])
    o2m_ours = pairs(crit.o2m.matcher(outputs["o2m"]["pred_logits"], outputs["o2m"]["pred_boxes"], targets))
    o2m_out = {k.removesuffix("_o2m"): v for k, v in off_out.items() if k.endswith("_o2m")}
    o2m_theirs = official.matcher.BinaryOneToManyMatcher(alpha=0.3, threshold=0.4, topk=4)(o2m_out, off_targets)
    assert o2m_ours == official_pairs(*o2m_theirs)
    assert len(o2m_ours) > len(hungarian) / 2  # the case exercises the one-to-many assignment
