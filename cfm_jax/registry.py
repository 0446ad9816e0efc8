"""Name -> (config class, module class) for the two slots of a block: "ffn" and "mixer".

A new variant is one file with a frozen config dataclass and a Flax NNX module decorated with
`@register(slot, kind, ConfigClass)`: anywhere under `cfm_jax/layers/` or `baselines/` (imported on
first use), or anywhere else as a plugin: `CFM_JAX_PLUGINS=pkg.module,/path/to/file.py` (or the
command line's `--plugin`, which sets that variable so sweeps' child processes load it too).

A built-in module that fails to import leaves the other kinds working (a one-line warning names it);
a plugin that fails to import is a UserError naming it and the exception.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import pkgutil
import sys
from pathlib import Path
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

from cfm_jax.errors import UserError, one_line

SLOTS = ("ffn", "mixer")
# Packages whose modules are imported to populate the registry.
_PLUGIN_PACKAGES = ("cfm_jax.layers", "baselines")
PLUGINS_ENV = "CFM_JAX_PLUGINS"  # comma list of module names or .py paths imported after the packages


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
        where = lambda c: f"{c.__module__}.{c.__qualname__}"
        if previous is not None and where(previous.module_cls) != where(module_cls):
            raise ValueError(f"{slot} kind {kind!r} registered twice ({where(previous.module_cls)}, {where(module_cls)})")
        config_cls.kind, config_cls.slot = kind, slot
        _REGISTRY[slot][kind] = Entry(slot, kind, config_cls, module_cls)
        return module_cls

    return decorate


_broken: dict[str, str] = {}  # built-in module file -> "ExceptionType: message"


def import_plugin(spec: str) -> None:
    """Import one plugin: a dotted module name, or a path to a .py file (imported under its stem)."""
    spec = spec.strip()
    try:
        if spec.endswith(".py") or os.sep in spec:
            path = Path(spec).expanduser()
            if not path.is_file():
                raise UserError(f"plugin {spec!r} is not a file (give a .py path or an importable module name)")
            name = f"cfm_jax_plugin_{path.stem}"
            module_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module
            module_spec.loader.exec_module(module)
        else:
            importlib.import_module(spec)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - any error in user code is reported as one line
        raise UserError(f"plugin {spec!r} failed to import ({one_line(e)})") from None


def load_plugins() -> None:
    """Import every module of the plugin packages once, so their @register calls run, then the
    plugins named in CFM_JAX_PLUGINS."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for package_name in _PLUGIN_PACKAGES:
        package = importlib.import_module(package_name)
        for info in pkgutil.iter_modules(package.__path__, package_name + "."):
            try:
                importlib.import_module(info.name)
            except Exception as e:  # noqa: BLE001 - one broken variant must not take the others down
                where = info.name.replace(".", "/") + ".py"
                _broken[where] = one_line(e)
                print(f"warning: {where} failed to import ({_broken[where]}); its kinds are unavailable",
                      file=sys.stderr)
    for spec in filter(None, os.environ.get(PLUGINS_ENV, "").split(",")):
        import_plugin(spec)


def broken_modules() -> dict[str, str]:
    load_plugins()
    return dict(_broken)


def kinds(slot: str) -> list[str]:
    load_plugins()
    return sorted(_REGISTRY[slot])


def get(slot: str, kind: str) -> Entry:
    load_plugins()
    if kind not in _REGISTRY[slot]:
        broken = "".join(f"; {where} failed to import ({why})" for where, why in _broken.items())
        raise UserError(f"unknown {slot} kind {kind!r}; allowed: {', '.join(kinds(slot))}{broken}")
    return _REGISTRY[slot][kind]


def default_config(slot: str, kind: str) -> SlotConfig:
    return get(slot, kind).config_cls()


def build(config: SlotConfig, ctx: LayerContext, rngs: Any):
    """Instantiate the module registered for this config's kind."""
    return get(config.slot, config.kind).module_cls(config, ctx, rngs=rngs)
