"""COCO tools: json I/O errors (coco_json), masks (polygon/RLE, masks), whole-directory writes (output_dirs),
normalise_coco (coco_convert)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from sam3lora.data.coco_convert import normalise_coco
from sam3lora.data.coco_json import read_coco
from sam3lora.data.data_error import DataError, DataWarning
from sam3lora.data.masks import annotation_to_mask, mask_to_polygons
from sam3lora.data.output_dirs import output_dir
from sam3lora.data.validate import DatasetProblems

W, H = 64, 48


def _masks(rng: np.random.Generator, n: int) -> list[np.ndarray]:
    """n random blob masks (H, W), each a union of two rectangles and a disc."""
    yy, xx = np.mgrid[0:H, 0:W]
    out = []
    for _ in range(n):
        m = np.zeros((H, W), bool)
        for _ in range(2):
            x0, y0 = rng.integers(0, W - 12), rng.integers(0, H - 12)
            m[y0:y0 + rng.integers(4, 12), x0:x0 + rng.integers(4, 12)] = True
        cx, cy, r = rng.integers(8, W - 8), rng.integers(8, H - 8), rng.integers(3, 8)
        m |= (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
        out.append(m)
    return out


def _uncompressed_rle(m: np.ndarray) -> dict:
    """COCO uncompressed RLE (column-major run lengths, starting with zeros)."""
    flat = m.ravel(order="F").astype(np.uint8)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0]:
        counts = [0, *counts]
    return {"size": [H, W], "counts": counts}


def _encode(m: np.ndarray, form: str) -> object:
    if form == "polygon":
        return mask_to_polygons(m)
    if form == "rle":
        rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        return {"size": [H, W], "counts": rle["counts"].decode()}
    return _uncompressed_rle(m)


def make_coco(root: Path, layout: str, forms: tuple[str, ...], seed: int = 0, roboflow_dummy: bool = False,
              crowd: bool = False) -> dict[tuple[str, str], list[np.ndarray]]:
    """Write a 2-split COCO set; return ``{(split, file_name): [mask per annotation]}``."""
    rng = np.random.default_rng(seed)
    truth: dict[tuple[str, str], list[np.ndarray]] = {}
    for split, disk in (("train", "train"), ("val", "valid" if layout == "roboflow" else "val")):
        if layout == "roboflow":
            img_dir, ann_file = root / disk, root / disk / "_annotations.coco.json"
        elif layout == "classic_images":
            img_dir, ann_file = root / "images" / disk, root / "annotations" / f"instances_{disk}.json"
        else:
            img_dir, ann_file = root / disk, root / "annotations" / f"instances_{disk}.json"
        img_dir.mkdir(parents=True, exist_ok=True)
        ann_file.parent.mkdir(parents=True, exist_ok=True)
        images, anns = [], []
        for i in range(2):
            name = f"{split}_{i}.jpg"
            Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(img_dir / name)
            images.append({"id": 10 + i, "file_name": name, "width": W, "height": H})
            masks = _masks(rng, 3)
            truth[(split, name)] = masks
            for k, m in enumerate(masks):
                rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
                anns.append({"id": 100 + 10 * i + k, "image_id": 10 + i, "category_id": 1 + k % 2,
                             "segmentation": _encode(m, forms[(i + k) % len(forms)]),
                             "bbox": mask_utils.toBbox(rle).tolist(), "area": float(m.sum()),
                             "iscrowd": int(crowd and k == 2)})
        cats = [{"id": 1, "name": "cat", "supercategory": "animals"},
                {"id": 2, "name": "dog", "supercategory": "animals"}]
        if roboflow_dummy:
            cats.insert(0, {"id": 0, "name": "animals", "supercategory": "none"})
        ann_file.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return truth


def _out_masks(out: Path) -> dict[tuple[str, str], list[np.ndarray]]:
    res = {}
    for split in ("train", "val"):
        data = json.loads((out / split / "annotations.json").read_text())
        for im in data["images"]:
            assert (out / split / "images" / im["file_name"]).is_file()
            res[(split, im["file_name"])] = [annotation_to_mask(a["segmentation"], im["height"], im["width"])
                                             for a in data["annotations"] if a["image_id"] == im["id"]]
    return res


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        len(a[k]) == len(b[k]) and all(np.array_equal(x, y) for x, y in zip(a[k], b[k], strict=True)) for k in a)


@pytest.mark.parametrize("layout", ["roboflow", "classic", "classic_images"])
def test_rle_and_polygon_inputs_give_identical_masks(tmp_path: Path, layout: str) -> None:
    truth = make_coco(tmp_path / "poly", layout, ("polygon",))
    make_coco(tmp_path / "rle", layout, ("rle", "uncompressed"))
    poly = _out_masks(normalise_coco(tmp_path / "poly", tmp_path / "out_poly"))
    rle = _out_masks(normalise_coco(tmp_path / "rle", tmp_path / "out_rle"))
    assert _same(poly, rle)
    assert _same(rle, truth)  # RLE is kept as it is: bit-identical to the source masks
    assert sum(len(v) for v in poly.values()) == 12


def test_mask_to_polygons_round_trip_with_hole() -> None:
    yy, xx = np.mgrid[0:H, 0:W]
    ring = ((xx - 30) ** 2 + (yy - 24) ** 2 <= 15 ** 2) & ((xx - 30) ** 2 + (yy - 24) ** 2 > 7 ** 2)
    back = annotation_to_mask(mask_to_polygons(ring), H, W)
    assert not (back & ~ring).any(), "the hole must stay empty"
    assert (back & ring).sum() / ring.sum() > 0.97  # only the slit is lost


def test_roboflow_dummy_category_dropped_and_crowd_kept(tmp_path: Path) -> None:
    make_coco(tmp_path / "src", "roboflow", ("polygon",), roboflow_dummy=True, crowd=True)
    with pytest.warns(DataWarning, match="dropping category 0 'animals'"):
        out = normalise_coco(tmp_path / "src", tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == [".sam3lora-converted", "train", "val"]
    data = json.loads((out / "train" / "annotations.json").read_text())
    assert [c["name"] for c in data["categories"]] == ["cat", "dog"]
    assert sum(a["iscrowd"] for a in data["annotations"]) == 2


def test_prompts_yaml(tmp_path: Path) -> None:
    make_coco(tmp_path / "src", "classic", ("polygon",))
    prompts = tmp_path / "prompts.yaml"
    prompts.write_text("cat: a small cat\ndog: [dog, puppy]\n")
    out = normalise_coco(tmp_path / "src", tmp_path / "out", prompts=prompts)
    cats = json.loads((out / "val" / "annotations.json").read_text())["categories"]
    assert {c["name"]: c["prompts"] for c in cats} == {"cat": ["a small cat"], "dog": ["dog", "puppy"]}
    prompts.write_text("cat: kitty\nzebra: striped horse\n")
    with pytest.raises(DataError, match="'zebra' not a category") as err:
        normalise_coco(tmp_path / "src", tmp_path / "out2", prompts=prompts)
    assert err.value.path == str(prompts)
    prompts.write_text("cat: [1, 2\n")
    with pytest.raises(DataError, match="invalid YAML"):
        normalise_coco(tmp_path / "src", tmp_path / "out2", prompts=prompts)
    assert not (tmp_path / "out2").exists()


@pytest.mark.parametrize(
    ("text", "match"),
    [("{not json", "invalid JSON"), ('{"images": [], "categories": []}', "missing key 'annotations'"),
     ('{"images": [{"id": 1}], "annotations": [], "categories": []}', r"images\[0\].*missing key"),
     ("[]", "top level must be a JSON object")],
)
def test_read_coco_errors_name_the_file(tmp_path: Path, text: str, match: str) -> None:
    f = tmp_path / "bad.json"
    f.write_text(text)
    with pytest.raises(DataError, match=match) as err:
        read_coco(f)
    assert err.value.path == str(f) and str(err.value).startswith(str(f))


def test_missing_image_leaves_no_output(tmp_path: Path) -> None:
    make_coco(tmp_path / "src", "roboflow", ("polygon",))
    (tmp_path / "src" / "valid" / "val_1.jpg").unlink()
    with pytest.raises(DatasetProblems, match=r"val_1\.jpg \[id 11\]: image file not found"):
        normalise_coco(tmp_path / "src", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_output_dir_is_whole_or_nothing(tmp_path: Path) -> None:
    target = tmp_path / "t"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(DataError, match="not empty"), output_dir(target):
        pass
    with pytest.raises(RuntimeError), output_dir(target, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
        raise RuntimeError("boom")
    assert [p.name for p in tmp_path.iterdir()] == ["t"] and (target / "old.txt").exists()
    with output_dir(target, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new.txt"] and [p.name for p in tmp_path.iterdir()] == ["t"]
    with pytest.raises(DataError, match="must not overlap"):
        normalise_coco(tmp_path, target, overwrite=True)


def test_convert_refuses_with_every_problem_and_writes_nothing(tmp_path: Path) -> None:
    """Unknown category, box outside the image, truncated JPEG: each one an issue naming its file and id."""
    make_coco(tmp_path / "src", "roboflow", ("polygon",))
    ann_file = tmp_path / "src" / "train" / "_annotations.coco.json"
    data = json.loads(ann_file.read_text())
    data["annotations"][0]["category_id"] = 42
    data["annotations"][4]["bbox"] = [50.0, 40.0, 30.0, 20.0]
    ann_file.write_text(json.dumps(data))
    jpg = tmp_path / "src" / "valid" / "val_0.jpg"
    jpg.write_bytes(jpg.read_bytes()[: jpg.stat().st_size // 2])
    with pytest.raises(DatasetProblems) as err:
        normalise_coco(tmp_path / "src", tmp_path / "out")
    got = sorted((i.split, Path(i.file).name, i.id, i.message.split(" (")[0]) for i in err.value.issues)
    assert got == [("train", "_annotations.coco.json", 100, "unknown category id 42"),
                   ("train", "_annotations.coco.json", 111, "box [50.0, 40.0, 30.0, 20.0] outside the 64x48 image"),
                   ("val", "val_0.jpg", 10, "image file is truncated")]
    assert err.value.path == str(tmp_path / "src") and "3 problem(s)" in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
