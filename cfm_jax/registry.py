"""Name -> (config class, module class) for the two slots of a block: "ffn" and "mixer".

A new variant is one file (anywhere under `cfm_jax/layers/` or `baselines/`) with a frozen config
dataclass and a Flax NNX module decorated with `@register(slot, kind, ConfigClass)`. Those packages
are imported on first use, so registration needs no edit anywhere else.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

from cfm_jax.errors import UserError

SLOTS = ("ffn", "mixer")
# Packages whose modules are imported to populate the registry.
_PLUGIN_PACKAGES = ("cfm_jax.layers", "baselines")


@dataclass(frozen=True)
class SlotConfig:
    """Base of every ffn/mixer config. `kind` is set by `register`; fields are the kind's knobs."""

    kind: ClassVar[str] = ""
    slot: ClassVar[str] = ""

    def validate(self, d_model: int) -> None:
        """Raise UserError (one line) if this config cannot be built at width d_model."""

    def validate_mesh(self, axes: dict[str, int]) -> None:
        """Raise UserError (one line) if this config cannot run on a mesh with these axis sizes."""


class LayerContext(NamedTuple):
    """Where a slot module sits in the model; modules use what they need (e.g. output init scale)."""

    d_model: int  # residual stream width
    n_layers: int  # depth of the model (for depth-scaled init)
    layer: int  # index of this block, 0-based
    init_std: float  # std of the normal init of input projections


class Entry(NamedTuple):
    slot: str
    kind: str
    config_cls: type
    module_cls: type


_REGISTRY: dict[str, dict[str, Entry]] = {slot: {} for slot in SLOTS}
_loaded = False


def register(slot: str, kind: str, config_cls: type):
    """Class decorator: register `module_cls` with `config_cls` under `slot`/`kind`."""
    if slot not in SLOTS:
        raise ValueError(f"unknown slot {slot!r}; allowed: {', '.join(SLOTS)}")
    if not (dataclasses.is_dataclass(config_cls) and issubclass(config_cls, SlotConfig)):
        raise TypeError(f"{config_cls.__name__} must be a frozen dataclass subclassing SlotConfig")

    def decorate(module_cls: type) -> type:
        previous = _REGISTRY[slot].get(kind)
        if previous is not None and previous.module_cls.__qualname__ != module_cls.__qualname__:
            raise ValueError(f"{slot} kind {kind!r} registered twice")
        config_cls.kind, config_cls.slot = kind, slot
        _REGISTRY[slot][kind] = Entry(slot, kind, config_cls, module_cls)
        return module_cls

    return decorate


def load_plugins() -> None:
    """Import every module of the plugin packages once, so their @register calls run."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for package_name in _PLUGIN_PACKAGES:
        package = importlib.import_module(package_name)
        for info in pkgutil.iter_modules(package.__path__, package_name + "."):
            importlib.import_module(info.name)


def kinds(slot: str) -> list[str]:
    load_plugins()
    return sorted(_REGISTRY[slot])


def get(slot: str, kind: str) -> Entry:
    load_plugins()
    if kind not in _REGISTRY[slot]:
        raise UserError(f"unknown {slot} kind {kind!r}; allowed: {', '.join(kinds(slot))}")
    return _REGISTRY[slot][kind]


def default_config(slot: str, kind: str) -> SlotConfig:
    return get(slot, kind).config_cls()


def build(config: SlotConfig, ctx: LayerContext, rngs: Any):
    """Instantiate the module registered for this config's kind."""
    return get(config.slot, config.kind).module_cls(config, ctx, rngs=rngs)
