"""Transforms: resize modes, augment from `_target_` dicts, masks/boxes kept consistent, normalisation."""

from __future__ import annotations

import albumentations as A
import numpy as np
import pytest
import torch

from sam3lora.data.readers import Instance
from sam3lora.data.transforms import build_transform, content_fraction, square_sizes

S = 64
MEAN, STD = [0.5, 0.4, 0.3], [0.5, 0.25, 0.2]
FLIP = {"_target_": "albumentations.HorizontalFlip", "p": 1.0}


def make(cfg, train=True, size=S):
    return build_transform(cfg, image_size=size, mean=MEAN, std=STD, train=train)


def scene(h: int = 60, w: int = 100):
    """A white-ish image with a masked rectangle (cat 1), a masked disc (cat 2) and a box-only object (cat 3)."""
    rng = np.random.default_rng(0)
    image = rng.integers(100, 255, (h, w, 3), dtype=np.uint8)
    rect = np.zeros((h, w), np.uint8)
    rect[10:25, 8:40] = 1
    yy, xx = np.mgrid[:h, :w]
    disc = ((yy - 40) ** 2 + (xx - 70) ** 2 <= 12**2).astype(np.uint8)
    instances = [
        Instance(1, (8, 10, 32, 15), rect),
        Instance(2, (58, 28, 25, 25), disc),
        Instance(3, (44, 30, 10, 20), None),
    ]
    return image, instances


def tight_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Normalised xyxy tight boxes of bool masks (n, S, S)."""
    out = []
    for m in masks:
        ys, xs = torch.nonzero(m, as_tuple=True)
        out.append(torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float() / m.shape[-1])
    return torch.stack(out) if out else torch.zeros(0, 4)


def assert_consistent(out) -> None:
    n = len(out.kept)
    assert out.masks.shape == (n, S, S) and out.masks.dtype == torch.bool
    assert out.boxes.shape == (n, 4) and out.has_mask.shape == (n,) and out.category_ids.shape == (n,)
    m = out.has_mask
    assert torch.allclose(out.boxes[m], tight_boxes(out.masks[m]))
    assert not out.masks[~m].any()
    assert ((out.boxes >= 0) & (out.boxes <= 1)).all() and (out.boxes[:, 2:] > out.boxes[:, :2]).all()


def test_stretch_resizes_masks_and_boxes_together_and_normalises():
    image, instances = scene()
    out = make({"resize": "stretch"}, train=False)(image, instances)
    assert out.pixel_values.shape == (3, S, S) and out.pixel_values.dtype == torch.float32
    assert_consistent(out)
    assert out.kept.tolist() == [0, 1, 2] and out.category_ids.tolist() == [1, 2, 3]
    assert out.has_mask.tolist() == [True, True, False]
    # the box-only box is scaled like the image (x by 64/100, y by 64/60), in normalised units
    assert torch.allclose(out.boxes[2], torch.tensor([44 / 100, 30 / 60, 54 / 100, 50 / 60]), atol=1e-5)
    assert torch.allclose(out.boxes[0], torch.tensor([8 / 100, 10 / 60, 40 / 100, 25 / 60]), atol=1 / S)
    white = make({"resize": "stretch"}, train=False)(np.full((8, 8, 3), 255, np.uint8), [])
    expected = (1 - torch.tensor(MEAN)) / torch.tensor(STD)
    assert torch.allclose(white.pixel_values[:, 0, 0], expected)


def test_forced_horizontal_flip_keeps_masks_and_boxes_in_agreement():
    image, instances = scene()
    plain = make({"resize": "stretch"})(image, instances, seed=0)
    flipped = make({"resize": "stretch", "augment": [FLIP]})(image, instances, seed=0)
    assert_consistent(flipped)
    assert torch.equal(flipped.masks, plain.masks.flip(-1))
    assert torch.allclose(flipped.pixel_values, plain.pixel_values.flip(-1))
    x0, y0, x1, y1 = plain.boxes[2]
    assert torch.allclose(flipped.boxes[2], torch.stack([1 - x1, y0, 1 - x0, y1]), atol=1e-5)


def test_letterbox_keeps_aspect_and_pads_bottom():
    image, instances = scene(h=50, w=100)  # 2:1 -> content 64 x 32 at the top
    out = make({"resize": "letterbox"}, train=False)(image, instances)
    assert_consistent(out)
    pad = -torch.tensor(MEAN) / torch.tensor(STD)  # a zero pixel after normalisation
    assert torch.allclose(out.pixel_values[:, 32:, :], pad.view(3, 1, 1).expand(3, 32, S))
    assert not torch.allclose(out.pixel_values[:, 31, :], pad.view(3, 1).expand(3, S))
    w, h = ((out.boxes[0, 2:] - out.boxes[0, :2]) * S).tolist()  # the 32 x 15 rectangle keeps its aspect
    assert abs(w - 32 * 0.64) <= 1 and abs(h - 15 * 0.64) <= 1
    assert content_fraction((50, 100), "letterbox") == (0.5, 1.0)
    assert content_fraction((50, 100), "stretch") == (1.0, 1.0)


def test_random_square_resizes_to_a_candidate_and_pads_at_random():
    image = np.full((40, 80, 3), 255, np.uint8)
    mask = np.zeros((40, 80), np.uint8)
    mask[5:30, 10:60] = 1
    instances = [Instance(1, (10, 5, 50, 25), mask), Instance(2, (60, 10, 15, 20), None)]
    cfg = {"resize": "random_square", "scale_range": [32, 56], "scale_step": 8}
    transform = make(cfg)
    sizes, corners = set(), set()
    for seed in range(25):
        out = transform(image, instances, seed=seed)
        assert_consistent(out)
        assert len(out.kept) == 2
        content = (out.pixel_values[0] > 0).nonzero()  # white image -> positive, zero padding -> negative
        (top, left), (bottom, right) = content.min(0).values.tolist(), content.max(0).values.tolist()
        side = bottom - top + 1
        assert side == right - left + 1 and side in square_sizes([32, 56], 8, S)
        sizes.add(side)
        corners.add((top, left))
        mx0, my0 = out.boxes[0, :2] * S  # objects moved with the image
        assert left <= mx0 and top <= my0
    assert len(sizes) >= 3 and len(corners) >= 10


def test_same_seed_same_output_and_other_seed_differs():
    image, instances = scene()
    flip = {"_target_": "albumentations.HorizontalFlip"}
    cfg = {"resize": "random_square", "scale_range": [0.5, 1.0], "scale_step": 8, "augment": [flip]}
    a = make(cfg)(image, instances, seed=3)
    b = make(cfg)(image, instances, seed=3)
    assert torch.equal(a.pixel_values, b.pixel_values) and torch.equal(a.masks, b.masks)
    assert any(not torch.equal(a.pixel_values, make(cfg)(image, instances, seed=s).pixel_values) for s in range(4, 8))


def test_instances_pushed_out_are_removed_from_masks_boxes_and_labels():
    image, instances = scene()
    # shift everything 40 px right: the disc (x 58..83 -> 37..53 at 64 px) and the box-only object leave
    shift = {"_target_": "albumentations.Affine", "translate_px": {"x": 40, "y": 0}, "p": 1.0}
    out = make({"resize": "stretch", "augment": [shift]})(image, instances, seed=0)
    assert_consistent(out)
    assert out.kept.tolist() == [0] and out.category_ids.tolist() == [1] and out.has_mask.tolist() == [True]


def test_already_built_albumentations_objects_are_accepted():
    image, instances = scene()
    out = make({"resize": "stretch", "augment": [A.HorizontalFlip(p=1.0)]})(image, instances, seed=0)
    ref = make({"resize": "stretch", "augment": [FLIP]})(image, instances, seed=0)
    assert torch.equal(out.masks, ref.masks)


def test_square_sizes_in_pixels_and_fractions():
    assert square_sizes([480, 992], 32, 1008) == list(range(480, 993, 32))
    assert square_sizes([0.476, 0.985], 32, 1008) == list(range(480, 993, 32))
    assert square_sizes([0.5, 1.0], 32, 224) == [112, 144, 176, 208]


@pytest.mark.parametrize(
    ("cfg", "train", "match"),
    [
        ({"resize": "crop"}, True, "resize must be one of"),
        ({"rezise": "stretch"}, True, "unknown transform key"),
        ({"resize": "random_square"}, False, "validation takes stretch or letterbox"),
        ({"resize": "stretch", "augment": [FLIP]}, False, "validation is resize only"),
        ({"resize": "stretch", "scale_range": [32, 64]}, True, "only apply to resize: random_square"),
        ({"resize": "random_square", "scale_range": [32, 128], "scale_step": 8}, True, "max <= image_size"),
        ({"resize": "random_square", "scale_range": [32, 64]}, True, r"needs \['scale_step'\]"),
        ({"augment": [FLIP]}, True, "transforms need 'resize'"),
        ({"resize": "stretch", "augment": [{"p": 1.0}]}, True, "_target_"),
        ({"resize": "stretch", "augment": [{"_target_": "collections.OrderedDict"}]}, True, "not an albumentations"),
    ],
)
def test_bad_configs_are_refused(cfg, train, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make(cfg, train=train)


def test_an_augment_that_changes_the_size_or_dtype_is_refused():
    crop = {"_target_": "albumentations.CenterCrop", "height": 32, "width": 32}
    image, instances = scene()
    with pytest.raises(ValueError, match="changed the size"):
        make({"resize": "stretch", "augment": [crop]})(image, instances, seed=0)
    with pytest.raises(ValueError, match="must keep uint8"):
        make({"resize": "stretch", "augment": [{"_target_": "albumentations.Normalize"}]})(image, instances, seed=0)
