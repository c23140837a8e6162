"""The shipped Hydra configs as Python objects.

The YAML in ``conf/`` (the package ``sam3lora.conf`` in the wheel) is the one place every default is stated: the
settings classes it instantiates (``LoraSettings``, ``ScheduleSettings``, ``MetricSettings``, ``PerfSettings``,
``Sam3DataModule``, ...) take no defaults of their own. Python users and tests build them from it::

    from sam3lora.config import defaults
    lora = defaults("lora/balanced", rank=4)                 # the balanced preset at rank 4
    schedule = defaults("module/default.scheduler", warmup_steps=0)
    data = defaults("data/synthetic", processor=processor)   # extra constructor arguments pass through

A spec is ``GROUP/OPTION`` (the option chosen for that group of ``train.yaml``, e.g. ``lora/minimal``) or a
primary config name (``train``, ``eval``), optionally followed by ``.key.path`` to a node inside it. The whole
config is composed first, so interpolations such as ``${model.image_size}`` resolve as in ``sam3lora-train``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sam3lora.errors import Sam3LoRAError

CONF_MODULE = "sam3lora.conf"
# conf/ of the repository, shipped in the wheel as the package sam3lora.conf (editable installs map it onto conf/):
# what the CLIs give Hydra; a user adds their own directory with --config-dir DIR or hydra.searchpath=[file://DIR]
CONF_DIR = f"pkg://{CONF_MODULE}"
PRIMARY = ("train", "eval")


class ConfigSpecError(Sam3LoRAError, ValueError):
    """A spec that names no shipped config node."""


def compose_config(config_name: str = "train", overrides: Sequence[str] = ()) -> DictConfig:
    """The shipped primary config ``config_name`` composed with Hydra command-line ``overrides``.

    Uses Hydra's global state for the call: not for use inside a running Hydra app (its config is at hand there).
    """
    from hydra import compose, initialize_config_module

    with initialize_config_module(CONF_MODULE, version_base="1.3"):
        return compose(config_name, overrides=list(overrides))


def config_node(spec: str, overrides: Sequence[str] = ()) -> DictConfig:
    """The node ``spec`` names (see the module docstring), with ``overrides`` applied to the whole config; its
    interpolations resolve when read (those into ``hydra:`` runtime values only inside a Hydra app).

    Raises :class:`ConfigSpecError` naming the spec when the group, option or key does not exist.
    """
    head, _, path = spec.partition(".")
    if "/" in head:
        group, option = head.split("/", 1)
        config_name, overrides = "train", [f"{group}={option}", *overrides]
        path = f"{group}.{path}" if path else group
    elif head in PRIMARY:
        config_name = head
    else:
        raise ConfigSpecError(f"config spec {spec!r}: expected GROUP/OPTION[.key] or one of {PRIMARY}[.key]")
    try:
        cfg = compose_config(config_name, overrides)
    except Exception as err:  # Hydra's MissingConfigException, ConfigCompositionException, ...
        raise ConfigSpecError(f"config spec {spec!r}: {str(err).splitlines()[0]}") from None
    node = OmegaConf.select(cfg, path) if path else cfg
    if not isinstance(node, DictConfig):
        raise ConfigSpecError(f"config spec {spec!r}: no mapping at {path!r} of {config_name}.yaml")
    return node


def defaults(spec: str, /, **overrides: Any) -> Any:
    """Instantiate the shipped node ``spec`` (it has a ``_target_``), ``overrides`` merged into its keys.

    Mappings merge key by key (``detr_decoder={"enabled": True}`` keeps the other component keys); keys the node
    does not hold are passed on as constructor arguments (e.g. ``processor=``). A bad value raises the class's own
    error (e.g. ``ValueError`` naming ``module.perf.<key>``).
    """
    node = config_node(spec)
    if "_target_" not in node:
        raise ConfigSpecError(f"config spec {spec!r}: the node has no _target_ to build")
    return instantiate_node(node, **overrides)


def instantiate_node(node: Any, /, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate(node, **kwargs)`` that raises the target's own error for a bad value (it names the
    key), not Hydra's multi-line wrapper."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        if err.__cause__ is not None:
            raise err.__cause__ from None
        raise
