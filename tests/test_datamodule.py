"""Sam3DataModule end to end: yaml -> instantiate -> batches (contract shapes), modes, bad samples, custom
readers, seeds, the YOLO cache, and one forward pass of the tiny model on a collated batch."""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from sam3lora.config import defaults
from sam3lora.data.batch import Sam3Batch
from sam3lora.data.data_error import DataError
from sam3lora.data.datamodule import Sam3DataModule
from sam3lora.data.readers import BadSampleError, DatasetReader, ImageRecord, Instance
from sam3lora.data.rows import PromptSettings
from sam3lora.data.synthetic_shapes import write_synthetic
from sam3lora.data.validate import DatasetProblems

CONF = Path(__file__).resolve().parents[1] / "conf" / "data"
S = 224  # the tiny model's input size
FLIP = {"_target_": "albumentations.HorizontalFlip", "p": 1.0}


@pytest.fixture(scope="module")
def tiny_model():
    from sam3lora.model import load_model

    return load_model("tiny", dtype="float32", seed=0)


@pytest.fixture(scope="module")
def processor(tiny_model):
    return tiny_model[1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """``paths.data_dir`` holding ``synthetic/`` (6 train, 3 val images of 96 px, 5 categories)."""
    root = tmp_path_factory.mktemp("data")
    write_synthetic(root / "synthetic", train=6, val=3, size=96, seed=0)
    return root


def data_yaml(name: str) -> DictConfig:
    """``conf/data/<name>.yaml`` merged onto ``_common.yaml``, as its Hydra defaults list composes it."""
    own = OmegaConf.load(CONF / f"{name}.yaml")
    assert list(own.pop("defaults")) == ["_common", "_self_"]
    return OmegaConf.merge(OmegaConf.load(CONF / "_common.yaml"), own)


def compose(name: str, data_dir: Path, **overrides):
    """The data config as the lead's train.yaml would compose it (paths.data_dir, model.image_size)."""
    cfg = OmegaConf.create({"paths": {"data_dir": str(data_dir)}, "model": {"image_size": S},
                            "data": data_yaml(name)})
    cfg.data.num_workers = 0
    for key, value in overrides.items():
        OmegaConf.update(cfg, f"data.{key}", value, merge=False)
    return cfg


def direct_dm(processor, data_dir: Path, name: str = "synthetic", **changes) -> Sam3DataModule:
    """``Sam3DataModule`` called as a Python user would (no Hydra): the shipped config's arguments + ``changes``."""
    shipped = OmegaConf.to_container(compose(name, data_dir).data, resolve=True)
    return Sam3DataModule(processor, **{k: v for k, v in shipped.items() if not k.startswith("_")} | changes)


def make_dm(processor, data_dir: Path, name: str = "synthetic", stage: str = "fit", **overrides) -> Sam3DataModule:
    dm = instantiate(compose(name, data_dir, **overrides).data, processor=processor)
    dm.prepare_data()
    dm.setup(stage)
    return dm


def first(loader) -> Sam3Batch:
    return next(iter(loader))


def annotated_categories(root: Path, split: str) -> dict[int, set[int]]:
    data = json.loads((root / split / "annotations.json").read_text())
    cats: dict[int, set[int]] = {img["id"]: set() for img in data["images"]}
    for ann in data["annotations"]:
        cats[ann["image_id"]].add(ann["category_id"])
    return cats


def tight_boxes(masks: torch.Tensor) -> torch.Tensor:
    out = []
    for m in masks:
        ys, xs = torch.nonzero(m, as_tuple=True)
        out.append(torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float() / m.shape[-1])
    return torch.stack(out) if out else torch.zeros(0, 4)


def cxcywh_to_xyxy(b: torch.Tensor) -> torch.Tensor:
    return torch.cat([b[..., :2] - b[..., 2:] / 2, b[..., :2] + b[..., 2:] / 2], dim=-1)


def test_batch_has_the_contract_shapes_and_negatives_are_empty(processor, data_dir):
    dm = make_dm(processor, data_dir, batch_size=3)
    b = first(dm.train_dataloader())
    i, r = b.num_images, b.num_rows
    assert i == 3 and r >= 3
    assert b.pixel_values.shape == (i, 3, S, S) and b.pixel_values.dtype == torch.float32
    assert b.pixel_values.min() >= -1 and b.pixel_values.max() <= 1  # mean = std = 0.5
    assert b.image_index.shape == (r,) and b.image_index.dtype == torch.long
    assert (b.image_index.diff() >= 0).all() and set(b.image_index.tolist()) == set(range(i))  # contiguous
    for t in (b.input_ids, b.attention_mask):
        assert t.shape == (r, 32) and t.dtype == torch.long
    tokens = processor.tokenizer(b.prompts, padding="max_length", max_length=32, truncation=True, return_tensors="pt")
    assert torch.equal(b.input_ids, tokens["input_ids"]) and torch.equal(b.attention_mask, tokens["attention_mask"])
    assert b.input_boxes.shape == (r, 1, 4) and b.input_boxes.dtype == torch.float32  # text mode: one pad box
    assert (b.input_boxes_labels == -10).all() and b.input_boxes_labels.dtype == torch.long
    assert len(b.targets) == len(b.prompts) == r
    assert b.category_ids.shape == (r,) and b.image_ids.shape == (i,) and b.orig_sizes.shape == (i, 2)
    assert b.orig_sizes.tolist() == [[96, 96]] * i

    present = annotated_categories(data_dir / "synthetic", "train")
    names = {c: ps[0] for c, ps in dm.train_dataset.prompts.items()}
    negatives = 0
    for row, t in enumerate(b.targets):
        n = t["boxes"].shape[0]
        assert t["boxes"].dtype == torch.float32 and t["masks"].shape == (n, S, S) and t["masks"].dtype == torch.bool
        assert t["has_mask"].shape == (n,) and t["has_mask"].all()  # synthetic objects all have masks
        assert torch.allclose(t["boxes"], tight_boxes(t["masks"]))  # consistent after random_square + flip
        cid = int(b.category_ids[row])
        assert b.prompts[row] == names[cid]
        image_id = int(b.image_ids[b.image_index[row]])
        assert (n > 0) == (cid in present[image_id])  # a row is negative iff its category is absent
        negatives += n == 0
    assert 0 < negatives < r


def test_rows_of_one_image_share_one_image_tensor(processor, data_dir):
    dm = make_dm(processor, data_dir, batch_size=2)
    b = first(dm.val_dataloader())
    assert b.num_images == 2 and len(set(b.image_ids.tolist())) == 2
    for i in range(b.num_images):
        rows = b.rows_of_image(i)
        assert len(rows) == 5  # validation queries every category for every image
        assert sorted(b.category_ids[rows].tolist()) == [1, 2, 3, 4, 5]
    expanded = b.pixel_values[b.image_index]
    assert expanded.shape == (b.num_rows, 3, S, S)
    assert torch.equal(expanded[b.rows_of_image(1)[0]], b.pixel_values[1])


def test_forced_flip_moves_masks_and_boxes_together(processor, data_dir):
    dm = make_dm(processor, data_dir, train_transforms={"resize": "stretch", "augment": [FLIP]})
    reference = make_dm(processor, data_dir, train_transforms={"resize": "stretch"})  # same, without the flip
    for index in range(2):
        flipped, plain = dm.train_dataset[index], reference.train_dataset[index]
        assert flipped.image_id == plain.image_id and len(flipped.boxes) > 0
        assert torch.equal(flipped.masks, plain.masks.flip(-1))
        assert torch.allclose(flipped.pixel_values, plain.pixel_values.flip(-1))
        assert torch.allclose(flipped.boxes, tight_boxes(flipped.masks))
        x0, y0, x1, y1 = plain.boxes.unbind(-1)
        assert torch.allclose(flipped.boxes, torch.stack([1 - x1, y0, 1 - x0, y1], dim=-1), atol=1e-6)


def test_random_square_pads_and_keeps_objects_consistent(processor, data_dir):
    dm = make_dm(processor, data_dir, batch_size=6, train_transforms={"resize": "random_square",
                                                                      "scale_range": [0.5, 0.75], "scale_step": 32})
    b = first(dm.train_dataloader())
    corners = set()
    for i in range(b.num_images):
        black = (b.pixel_values[i] == -1).all(0)  # zero padding (pixel 0 -> -1 after normalisation)
        rows_black, cols_black = black.all(1), black.all(0)
        corners.add((int((~rows_black).nonzero()[0]), int((~cols_black).nonzero()[0])))
        assert rows_black.sum() >= S - 168 and cols_black.sum() >= S - 168  # content side <= 0.75 * 224
        for row in b.rows_of_image(i):
            t = b.targets[row]
            assert torch.allclose(t["boxes"], tight_boxes(t["masks"]))
            ys, xs = torch.nonzero(t["masks"].any(0), as_tuple=True)
            assert not rows_black[ys].any() and not cols_black[xs].any()  # objects lie in the content
    assert len(corners) > 1  # each image draws its own size and position


@pytest.mark.parametrize("mode", ["text", "box", "text+box"])
def test_prompt_modes(processor, data_dir, mode):
    dm = make_dm(processor, data_dir, batch_size=6, **{"prompts.mode": mode, "prompts.max_exemplars": 2})
    b = first(dm.train_dataloader())
    names = {c: ps[0] for c, ps in dm.train_dataset.prompts.items()}
    assert b.input_boxes.shape[1] == (1 if mode == "text" else 2)
    for row, t in enumerate(b.targets):
        labels = b.input_boxes_labels[row]
        name = names[int(b.category_ids[row])]
        if mode == "text" or len(t["boxes"]) == 0:  # negatives stay text-only with one pad box
            assert b.prompts[row] == name and labels[0] == -10 and (labels == -10).all()
            continue
        assert b.prompts[row] == ("visual" if mode == "box" else name)
        k = int((labels == 1).sum())
        assert 1 <= k <= min(2, len(t["boxes"])) and (labels[k:] == -10).all()
        for box in cxcywh_to_xyxy(b.input_boxes[row, :k]):  # exemplars are this row's own targets
            assert torch.isclose(t["boxes"], box, atol=1e-6).all(-1).any()


def _broken_copy(data_dir: Path, tmp_path: Path) -> tuple[Path, Path, Path, int]:
    """Copy of the synthetic set with one train and one val image file deleted (and the val image's id)."""
    root = tmp_path / "broken"
    shutil.copytree(data_dir / "synthetic", root / "synthetic")
    gone = []
    for split in ("train", "val"):
        data = json.loads((root / "synthetic" / split / "annotations.json").read_text())
        path = root / "synthetic" / split / "images" / data["images"][1]["file_name"]
        path.unlink()
        gone.append(path)
    return root, gone[0], gone[1], data["images"][1]["id"]


def test_bad_sample_raise_names_the_file(processor, data_dir, tmp_path):
    """A missing image is found when the split is opened (setup), before any batch."""
    root, gone, _, _ = _broken_copy(data_dir, tmp_path)
    with pytest.raises(DatasetProblems, match="image file not found") as err:
        make_dm(processor, root, batch_size=6, on_bad_sample="raise")
    assert str(err.value).startswith(f"{gone}: 1 problem(s) in split 'train'")
    assert [i.file for i in err.value.issues] == [str(gone)] and "on_bad_sample=skip" in str(err.value)


def test_up_front_checks_refuse_every_problem_or_skip_exactly_the_bad_samples(processor, data_dir, tmp_path,
                                                                              caplog):
    """Problems validate reports (unknown category, box outside the image, wrong size, duplicate ids) are refused
    all at once under raise; under skip exactly those samples are skipped, each counted once per epoch."""
    root = tmp_path / "bad" / "synthetic"
    shutil.copytree(data_dir / "synthetic", root)
    ann = root / "train" / "annotations.json"
    data = json.loads(ann.read_text())
    by_image = {}
    for a in data["annotations"]:
        by_image.setdefault(a["image_id"], a)
    ids = [im["id"] for im in data["images"]]
    by_image[ids[0]]["category_id"] = 99
    by_image[ids[2]]["bbox"] = [200.0, 200.0, 100.0, 100.0]
    data["images"][3]["width"] += 8  # annotated size differs from the file
    data["annotations"].append(dict(by_image[ids[0]], id=10**6, image_id=4242))  # names a missing image
    ann.write_text(json.dumps(data))
    with pytest.raises(DatasetProblems) as err:
        make_dm(processor, root.parent, batch_size=2, on_bad_sample="raise")
    got = sorted((i.id, i.message.split(" ")[0], i.sample) for i in err.value.issues)
    assert len(got) == 4 and {g[2] for g in got} == {ids[0], ids[2], ids[3], None}
    with caplog.at_level(logging.WARNING, logger="sam3lora.data"):
        dm = make_dm(processor, root.parent, batch_size=2, on_bad_sample="skip")
        batches = list(dm.train_dataloader())
    assert sorted(dm.train_dataset.known_bad) == [0, 2, 3]
    assert dm.train_dataset.bad_count() == 3
    with caplog.at_level(logging.WARNING, logger="sam3lora.data"):
        dm.teardown("fit")  # the last pass's count (earlier ones: when the next pass starts)
    assert "train split, epoch 1: skipped 3 bad sample(s)" in caplog.text
    assert "unknown category id 99" in caplog.text
    assert "ignored (on_bad_sample=skip)" in caplog.text and "missing image id 4242" in caplog.text
    seen = [i for b in batches for i in b.image_ids.tolist()]
    assert not {ids[0], ids[2], ids[3]} & set(seen) and len(seen) == len(ids)
    data["images"][5]["id"] = data["images"][4]["id"]  # duplicate image ids spoil the split: refused under skip
    ann.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"duplicate image id\(s\)"):
        make_dm(processor, root.parent, batch_size=2, on_bad_sample="skip")


def test_bad_sample_skip_logs_and_counts(processor, data_dir, tmp_path, caplog):
    root, gone_train, gone_val, gone_id = _broken_copy(data_dir, tmp_path)
    dm = make_dm(processor, root, batch_size=3, on_bad_sample="skip")
    with caplog.at_level(logging.WARNING, logger="sam3lora.data"):
        train = list(dm.train_dataloader())
        val = list(dm.val_dataloader())
        dm.teardown("fit")
    assert [b.num_images for b in train] == [3, 3]  # training replaces the bad image by the next one
    assert sum(b.num_images for b in val) == 2  # validation drops it
    assert gone_id not in [i for b in val for i in b.image_ids.tolist()]
    text = caplog.text
    assert str(gone_train) in text and str(gone_val) in text and "image file not found" in text
    assert "train split, epoch 1: skipped 1 bad sample(s)" in text
    assert "val split, epoch 1: skipped 1 bad sample(s)" in text


class TinyReader(DatasetReader):
    """A custom format defined outside the package: two in-memory images, one square of each category."""

    def images(self):
        return [ImageRecord(id=10 + i, path=self.root / self.split / f"{i}.raw", width=80, height=48)
                for i in range(2)]

    def categories(self):
        return {7: ["dot"], 8: ["bar", "stripe"]}

    def load_image(self, image):
        return np.full((image.height, image.width, 3), 40 * (image.id - 9), np.uint8)

    def instances(self, image):
        mask = np.zeros((image.height, image.width), np.uint8)
        mask[10:20, 30:50] = 1
        return [Instance(7, (30, 10, 20, 10), mask), Instance(8, (5, 5, 10, 30), None)]


class WrongMaskReader(TinyReader):
    def instances(self, image):
        return [Instance(7, (0, 0, 4, 4), np.ones((4, 4), np.uint8))]


class NotAReader:
    def __init__(self, root, split):
        pass


def test_custom_reader_via_target(processor, data_dir):
    dm = make_dm(processor, data_dir, batch_size=2, reader={"_target_": f"{__name__}.TinyReader"},
                 train_transforms={"resize": "stretch"})
    assert isinstance(dm.train_dataset.reader, TinyReader) and dm.train_dataset.reader.split == "train"
    assert dm.val_dataset.reader.split == "val" and dm.train_dataset.reader.root == data_dir / "synthetic"
    b = first(dm.val_dataloader())
    assert b.image_ids.tolist() == [10, 11] and b.orig_sizes.tolist() == [[48, 80]] * 2
    assert b.prompts == ["dot", "bar"] * 2 and b.category_ids.tolist() == [7, 8] * 2
    dot, bar = b.targets[0], b.targets[1]
    assert dot["has_mask"].tolist() == [True] and bar["has_mask"].tolist() == [False]
    assert torch.allclose(bar["boxes"], torch.tensor([[5 / 80, 5 / 48, 15 / 80, 35 / 48]]), atol=1e-5)
    # a class (no Hydra) works too; something that is not a DatasetReader is refused clearly
    direct = direct_dm(processor, data_dir, reader=TinyReader)
    direct.setup("validate")
    assert first(direct.val_dataloader()).prompts == ["dot", "bar", "dot", "bar"]
    with pytest.raises(TypeError, match="not a sam3lora.data.readers.DatasetReader"):
        make_dm(processor, data_dir, reader={"_target_": f"{__name__}.NotAReader"})
    wrong = make_dm(processor, data_dir, reader={"_target_": f"{__name__}.WrongMaskReader"})
    with pytest.raises(BadSampleError, match=r"val/0\.raw: instance 0: mask \(4, 4\) != image \(48, 80\)"):
        first(wrong.val_dataloader())


def _same(a: Sam3Batch, b: Sam3Batch) -> bool:
    return (torch.equal(a.pixel_values, b.pixel_values) and a.prompts == b.prompts
            and torch.equal(a.image_ids, b.image_ids) and torch.equal(a.input_boxes, b.input_boxes)
            and all(torch.equal(x["masks"], y["masks"]) for x, y in zip(a.targets, b.targets, strict=True)))


def test_same_seed_same_first_batch_with_or_without_workers(processor, data_dir):
    kw = {"batch_size": 3, "prompts.mode": "text+box", "seed": 5}
    a = first(make_dm(processor, data_dir, **kw).train_dataloader())
    b = first(make_dm(processor, data_dir, **kw).train_dataloader())
    assert _same(a, b)
    c = first(make_dm(processor, data_dir, **{**kw, "num_workers": 1}).train_dataloader())
    assert _same(a, c)  # randomness depends on (seed, epoch, index), not on the worker
    d = first(make_dm(processor, data_dir, **{**kw, "seed": 6}).train_dataloader())
    assert not _same(a, d)


def test_epoch_counter_advances_and_is_restored(processor, data_dir):
    dm = make_dm(processor, data_dir, batch_size=6)
    loader = dm.train_dataloader()
    e1, e2 = first(loader), first(loader)
    assert dm.state_dict() == {"epoch": 2}
    assert not _same(e1, e2)  # new epoch: new order and augmentation
    resumed = instantiate(compose("synthetic", data_dir, batch_size=6).data, processor=processor)
    resumed.load_state_dict({"epoch": 1})  # a checkpoint saved after the first epoch
    resumed.setup("fit")
    assert _same(first(resumed.train_dataloader()), e2)  # the second epoch, exactly


def test_lightning_sets_the_epoch_through_the_sampler(processor, data_dir):
    """Lightning calls ``set_epoch`` on the loader's sampler before each training epoch (0-based): that epoch's
    pass is exactly the one a plain loop reaches, also after passes that ran without it; workers are seeded by
    Lightning's ``pl_worker_init_function``."""
    from lightning.fabric.utilities.data import _set_sampler_epoch
    from lightning.fabric.utilities.seed import pl_worker_init_function

    dm = make_dm(processor, data_dir, batch_size=6)
    loader = dm.train_dataloader()
    assert loader.worker_init_fn is pl_worker_init_function
    e1, e2, _ = first(loader), first(loader), first(loader)
    _set_sampler_epoch(loader, 1)  # Lightning's epoch 1 is the second pass, whatever ran before
    assert _same(first(loader), e2) and dm.state_dict() == {"epoch": 2}
    _set_sampler_epoch(loader, 0)
    assert _same(first(loader), e1)
    assert not _same(first(loader), e1)  # without set_epoch the next pass moves on


@pytest.mark.parametrize("name", ["synthetic", "coco", "yolo"])
def test_every_yaml_key_is_an_argument(name):
    cfg = data_yaml(name)
    params = set(inspect.signature(Sam3DataModule.__init__).parameters) - {"self", "processor"}
    keys = set(cfg) - {"_target_", "_recursive_"}
    assert keys <= params and params - keys == set()
    for section in ("train_transforms", "val_transforms"):
        assert set(cfg[section]) <= {"resize", "scale_range", "scale_step", "augment"}


def test_coco_yaml_needs_a_root(processor, data_dir):
    with pytest.raises(Exception, match="root"):
        make_dm(processor, data_dir, name="coco")
    dm = make_dm(processor, data_dir, name="coco", root=str(data_dir / "synthetic"), batch_size=2, pin_memory=False)
    b = first(dm.train_dataloader())
    assert b.pixel_values.shape == (2, 3, S, S)


def _write_yolo(root: Path) -> Path:
    """A 2-class YOLO detection set: 2 train and 1 val image of 64 x 48 px, one box each."""
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i in range(2 if split == "train" else 1):
            Image.fromarray(np.full((48, 64, 3), 90 + 40 * i, np.uint8)).save(root / "images" / split / f"{i}.png")
            (root / "labels" / split / f"{i}.txt").write_text(f"{i % 2} 0.5 0.5 0.25 0.5\n")
    (root / "data.yaml").write_text("names: [apple, pear]\ntrain: images/train\nval: images/val\n")
    return root


def test_yolo_yaml_converts_once_into_the_cache(processor, tmp_path):
    src = _write_yolo(tmp_path / "yolo_src")
    dm = make_dm(processor, tmp_path, name="yolo", yolo_src=str(src), batch_size=2, pin_memory=False)
    cache = tmp_path / "yolo_cache"
    stamp = (cache / "train" / "annotations.json").stat().st_mtime_ns
    b = first(dm.val_dataloader())
    assert b.prompts == ["apple", "pear"] and b.orig_sizes.tolist() == [[48, 64]]
    apple = b.targets[0]
    assert apple["has_mask"].tolist() == [False] and not apple["masks"].any()  # detection label: box only
    assert torch.allclose(apple["boxes"], torch.tensor([[0.375, 0.25, 0.625, 0.75]]), atol=1e-5)
    again = make_dm(processor, tmp_path, name="yolo", yolo_src=str(src))
    assert (cache / "train" / "annotations.json").stat().st_mtime_ns == stamp  # reused, not converted again
    assert again.train_dataset is not None
    other = _write_yolo(tmp_path / "other_src")
    with pytest.raises(DataError, match="converted from"):
        make_dm(processor, tmp_path, name="yolo", yolo_src=str(other))


@pytest.mark.parametrize(("key", "value", "match"), [("on_bad_sample", "ignore", "on_bad_sample"),
                                                     ("prompts.mode", "points", r"data\.prompts\.mode must be"),
                                                     ("batch_size", 0, "batch_size")])
def test_bad_arguments_are_refused(processor, data_dir, key, value, match):
    with pytest.raises(Exception, match=match):
        make_dm(processor, data_dir, **{key: value})


def test_prompts_are_built_settings_or_their_config_node(processor, data_dir):
    """``prompts``: the ``data.prompts`` node (built by the module, as the data configs are not built recursively)
    or a PromptSettings a Python user built; anything else is refused naming the key."""
    shipped = defaults("data/synthetic.prompts")
    assert isinstance(shipped, PromptSettings) and direct_dm(processor, data_dir).settings == shipped
    mine = dataclasses.replace(shipped, mode="box")
    assert direct_dm(processor, data_dir, prompts=mine).settings is mine
    with pytest.raises(TypeError, match="^data.prompts must build a sam3lora.data.rows.PromptSettings"):
        direct_dm(processor, data_dir, prompts={"mode": "box"})


def test_collated_batch_runs_through_the_tiny_model(tiny_model, data_dir):
    model, processor = tiny_model
    dm = make_dm(processor, data_dir, batch_size=2, **{"prompts.mode": "text+box"})
    b = first(dm.train_dataloader())
    assert b.input_boxes.shape[1] >= 1
    with torch.no_grad():
        out = model(pixel_values=b.pixel_values[b.image_index], input_ids=b.input_ids,
                    attention_mask=b.attention_mask, input_boxes=b.input_boxes,
                    input_boxes_labels=b.input_boxes_labels)
    r, q = b.num_rows, model.config.detr_decoder_config.num_queries
    assert out.pred_logits.shape == (r, q) and out.pred_boxes.shape == (r, q, 4)
    assert out.presence_logits.shape == (r, 1)
    assert out.pred_masks.shape[:2] == (r, q) and out.pred_masks.shape[-1] == S * 2 // 7  # H / 3.5


def _write_coco(root: Path, images: list[dict], annotations: list[dict], categories: list[dict]) -> Path:
    (root / "train" / "images").mkdir(parents=True)
    for img in images:
        Image.fromarray(np.zeros((img["height"], img["width"], 3), np.uint8)).save(root / "train" / "images" /
                                                                                  img["file_name"])
    data = {"images": images, "annotations": annotations, "categories": categories}
    (root / "train" / "annotations.json").write_text(json.dumps(data))
    return root


def test_coco_reader_reads_masks_boxes_prompts_and_skips_crowds(tmp_path):
    from pycocotools import mask as mask_utils

    from sam3lora.data.readers import CocoReader

    square = np.zeros((32, 40), np.uint8, order="F")
    square[4:12, 20:30] = 1
    rle = mask_utils.encode(square)
    rle["counts"] = rle["counts"].decode()
    images = [{"id": 3, "file_name": "a.png", "width": 40, "height": 32}]
    annotations = [
        {"id": 1, "image_id": 3, "category_id": 1, "bbox": [2, 2, 6, 6], "iscrowd": 0,
         "segmentation": [[2, 2, 8, 2, 8, 8, 2, 8]]},
        {"id": 2, "image_id": 3, "category_id": 2, "bbox": [20, 4, 10, 8], "iscrowd": 0, "segmentation": rle},
        {"id": 3, "image_id": 3, "category_id": 2, "bbox": [0, 20, 40, 12], "iscrowd": 1, "segmentation": rle},
        {"id": 4, "image_id": 3, "category_id": 1, "bbox": [30, 20, 5, 5], "segmentation": [], "box_only": True},
    ]
    categories = [{"id": 1, "name": "red circle", "prompts": ["red circle", "crimson disc"]},
                  {"id": 2, "name": "blue square"}]
    original = json.dumps({"images": images, "annotations": annotations, "categories": categories})
    reader = CocoReader(_write_coco(tmp_path / "ds", images, annotations, categories), "train")
    assert dict(reader.categories()) == {1: ["red circle", "crimson disc"], 2: ["blue square"]}
    (record,) = reader.images()
    assert (record.id, record.width, record.height) == (3, 40, 32)
    assert record.path == tmp_path / "ds" / "train" / "images" / "a.png"
    poly, mask, box_only = reader.instances(record)  # the crowd annotation is skipped
    assert poly.category_id == 1 and poly.mask.shape == (32, 40) and poly.mask[3:8, 3:8].all()
    assert np.array_equal(mask.mask.astype(np.uint8), square) and mask.bbox == (20.0, 4.0, 10.0, 8.0)
    assert box_only.mask is None and box_only.bbox == (30.0, 20.0, 5.0, 5.0)
    assert reader.load_image(record).shape == (32, 40, 3)
    assert (tmp_path / "ds" / "train" / "annotations.json").read_text() == original  # input untouched


def test_coco_reader_errors_name_the_file(tmp_path):
    from sam3lora.data.readers import CocoReader

    images = [{"id": 1, "file_name": "a.png", "width": 16, "height": 16},
              {"id": 2, "file_name": "b.png", "width": 16, "height": 16}]
    categories = [{"id": 1, "name": "dot"}]
    bad = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 4, 4], "segmentation": [[1, 2, 3]]}]
    root = _write_coco(tmp_path / "ds", images, bad, categories)
    Image.fromarray(np.zeros((8, 16, 3), np.uint8)).save(root / "train" / "images" / "b.png")  # wrong size
    reader = CocoReader(root, "train")
    a, b = reader.images()
    with pytest.raises(BadSampleError, match=r"annotations\.json: annotation 1: polygon with 3 coordinates"):
        reader.instances(a)
    with pytest.raises(BadSampleError, match=r"b\.png: image is 16x8 \(WxH\) but annotated as 16x16"):
        reader.load_image(b)
    unknown = [{"id": 5, "image_id": 1, "category_id": 9, "bbox": [0, 0, 4, 4], "segmentation": []}]
    reader = CocoReader(_write_coco(tmp_path / "ds2", images[:1], unknown, categories), "train")
    assert [(i.id, i.message, i.sample) for i in reader.problems()] == [(5, "unknown category id 9", 1)]
    with pytest.raises(BadSampleError, match=r"annotations\.json: annotation 5: unknown category id 9"):
        reader.instances(reader.images()[0])
    with pytest.raises(DataError, match=r"missing.*annotations\.json: file not found"):
        CocoReader(tmp_path / "missing", "train")


def test_batch_moves_to_a_device_and_pins_every_tensor(processor, data_dir, monkeypatch):
    from lightning.fabric.utilities.apply_func import move_data_to_device

    b = first(make_dm(processor, data_dir, batch_size=2).train_dataloader())
    moved = move_data_to_device(b, torch.device("meta"))  # what Lightning does before training_step
    assert isinstance(moved, Sam3Batch) and moved.prompts == b.prompts
    assert all(t.device.type == "meta" for t in (moved.pixel_values, moved.image_index, moved.input_boxes))
    assert all(v.device.type == "meta" for t in moved.targets for v in t.values())
    pinned: list[torch.Tensor] = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: pinned.append(self) or self)  # no CUDA here
    copy = b.pin_memory()
    assert isinstance(copy, Sam3Batch) and copy.num_rows == b.num_rows
    assert len(pinned) == 11 + 3 * b.num_rows  # 11 tensor fields + boxes/masks/has_mask of every target


def test_synthetic_is_generated_into_root_once(processor, tmp_path):
    root = tmp_path / "synthetic"
    settings = {"train": 3, "val": 2, "size": 224, "seed": 0, "categories": None}
    dm = direct_dm(processor, tmp_path, root=root, synthetic=settings)
    dm.prepare_data()
    stamp = (root / "train" / "annotations.json").stat().st_mtime_ns
    assert len(list((root / "val" / "images").iterdir())) == 2
    direct_dm(processor, tmp_path, root=root, synthetic=settings).prepare_data()  # reused, not rewritten
    assert (root / "train" / "annotations.json").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="exclusive"):
        direct_dm(processor, tmp_path, root=root, synthetic=settings, yolo_src=str(tmp_path))
