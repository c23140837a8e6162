"""One place per default: the shipped YAML states each value, the Python classes it builds restate none of them.

Every node of the composed configs whose ``_target_`` is one of ours (and every mapping that becomes one of our
dataclasses, e.g. a LoRA component) is checked key by key: a key the YAML states must be a constructor argument
without a default (a default there would be a second statement of the value, agreeing or not). The settings the
eval app builds by hand (``EvalSettings`` from eval.yaml) and the model loaders (``conf/model``) are checked the
same way. ``sam3lora.config.defaults`` is what Python users call instead.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from pathlib import Path
from typing import Any

import pytest
from hydra.utils import get_object
from omegaconf import OmegaConf

from sam3lora.config import ConfigSpecError, config_node, defaults
from sam3lora.inference.evaluate import EvalSettings
from sam3lora.inference.model_with_adapters import load_for_inference
from sam3lora.model import load_model

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = ("lora", "data", "loss", "module", "callbacks")  # the groups whose options build our classes


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def parameters(target: Any) -> dict[str, inspect.Parameter]:
    """The arguments our own code declares (a class that keeps a library's ``__init__``, e.g. a ModelCheckpoint
    subclass, declares none: those defaults are the library's)."""
    own = target.__init__ if inspect.isclass(target) else target
    if not getattr(own, "__module__", "").startswith("sam3lora."):
        return {}
    return dict(inspect.signature(target).parameters)


def dataclass_of(annotation: Any) -> type | None:
    """The dataclass an annotation names (``X``, ``X | None``), else None."""
    for candidate in (annotation, *typing.get_args(annotation)):
        if dataclasses.is_dataclass(candidate):
            return candidate
    return None


def restated(node: Any, where: str) -> list[str]:
    """Keys of ``node`` (a plain container, recursively) that our target classes also give a default."""
    found: list[str] = []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    for key, value in items:
        found += restated(value, f"{where}.{key}")
    if not isinstance(node, dict) or not str(node.get("_target_", "")).startswith("sam3lora."):
        return found
    target = get_object(node["_target_"])
    found += stated_twice(target, node, where)
    hints = typing.get_type_hints(target.__init__ if inspect.isclass(target) else target)
    for key, value in node.items():
        cls = dataclass_of(hints.get(key))
        if cls is not None and isinstance(value, dict) and "_target_" not in value:
            found += stated_twice(cls, value, f"{where}.{key}")
    return found


def stated_twice(target: Any, node: dict[str, Any], where: str) -> list[str]:
    params = parameters(target)
    return [
        f"{where}.{key}: {getattr(target, '__name__', target)} default {params[key].default!r} restates the YAML "
        f"({value!r})"
        for key, value in node.items()
        if not key.startswith("_") and key in params and params[key].default is not inspect.Parameter.empty
    ]


def shipped(spec: str) -> Any:
    """The node as written (interpolations kept: they need a running app)."""
    return OmegaConf.to_container(config_node(spec), resolve=False)


@pytest.mark.parametrize("group", GROUPS)
def test_no_yaml_value_is_also_a_python_default(group: str) -> None:
    problems = [p for option in options(group) for p in restated(shipped(f"{group}/{option}"), group)]
    assert problems == []


def test_hand_built_eval_settings_take_every_value_from_the_yaml() -> None:
    """EvalSettings (sam3lora-eval's top-level keys) has no defaults, and every field is a key of eval.yaml."""
    node = config_node("eval")
    for f in dataclasses.fields(EvalSettings):
        assert f.name in node, f"EvalSettings.{f.name} is not in the YAML"
        assert f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING, (
            f"EvalSettings.{f.name} has a Python default")


#: arguments of the model loaders whose default is not a value: ``image_size=None`` checks nothing
NO_VALUE = {"image_size": None}


@pytest.mark.parametrize("option", options("model"))
def test_model_loaders_restate_no_model_key(option: str) -> None:
    """``conf/model/*.yaml`` is ``load_model(**cfg.model)``: every key is an argument without a default (but
    :data:`NO_VALUE`); ``load_for_inference`` (``base`` is ``name_or_path``) likewise for the keys it takes."""
    node = shipped(f"model/{option}")
    for loader, renames in ((load_model, {}), (load_for_inference, {"name_or_path": "base"})):
        params = inspect.signature(loader).parameters
        for key in node:
            name = renames.get(key, key)
            assert loader is not load_model or name in params, f"model.{key} is not an argument of load_model"
            if name in params:
                assert params[name].default is NO_VALUE.get(name, inspect.Parameter.empty), (
                    f"{loader.__name__}({name}={params[name].default!r}) restates conf/model/{option}.yaml")


def test_the_check_finds_a_restated_default() -> None:
    """The walk above is not vacuous: a target with a default for a stated key is reported, naming it."""
    good = {"_target_": "sam3lora.training.schedule.ScheduleSettings", "name": "cosine"}
    assert restated(good, "module.scheduler") == []  # every ScheduleSettings key is required
    bad = {"inner": {"_target_": "sam3lora.config.compose_config", "config_name": "train"}}
    assert restated(bad, "x") == ["x.inner.config_name: compose_config default 'train' restates the YAML ('train')"]


def test_defaults_builds_the_shipped_settings_with_overrides() -> None:
    schedule = defaults("module/default.scheduler", warmup_steps=3)
    shipped = OmegaConf.load(CONF / "module" / "default.yaml").scheduler
    assert (schedule.name, schedule.warmup_steps, schedule.min_lr_ratio) == (shipped.name, 3, shipped.min_lr_ratio)
    lora = defaults("lora/balanced", rank=4, text_encoder={"enabled": True})
    assert lora.rank == 4 and lora.text_encoder.enabled and lora.vision_encoder.enabled
    assert lora.vision_encoder.targets == list(OmegaConf.load(CONF / "lora" / "balanced.yaml").vision_encoder.targets)
    for spec in ("lora/nope", "module/default.nope", "nope"):
        with pytest.raises(ConfigSpecError, match=spec):
            defaults(spec)
