"""Experiment files: `experiments/NAME.py` defines the cells of one table.

An experiment file has a docstring (command, expected runtime, expected result) and

    def cells(scale: str) -> dict[str, list[str]]:   # cell name -> config overrides
    COLUMNS = ["val/bits_per_byte", ...]              # optional: eval.json metrics shown in the table
    ANALYSES = ["cett"]                               # optional: `eval --analysis` run on every cell

Every cell is an ordinary training run: `cfm-jax train --scale SCALE OVERRIDES...`.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from cfm_jax.config import Config, resolve
from cfm_jax.errors import UserError

CELL_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def experiments_dir() -> Path:
    """`experiments/` of the current directory if present, else the one next to this package."""
    local = Path.cwd() / "experiments"
    return local if local.is_dir() else Path(__file__).resolve().parents[2] / "experiments"


@dataclass(frozen=True)
class Experiment:
    name: str
    path: Path
    cells_fn: Callable[[str], dict]
    columns: tuple[str, ...]
    doc: str
    analyses: tuple[str, ...] = ()  # eval analyses run on every cell (ANALYSES in the file)

    def cells(self, scale: str) -> dict[str, list[str]]:
        try:
            cells = self.cells_fn(scale)
        except Exception as e:  # a bug in the experiment file is the user's input
            raise UserError(f"experiment {self.name!r}: cells({scale!r}) failed: {type(e).__name__}: {e}") from None
        if not isinstance(cells, dict) or not cells:
            raise UserError(f"experiment {self.name!r}: cells() must return a non-empty dict name -> [overrides]")
        for name, overrides in cells.items():
            if not isinstance(name, str) or not CELL_NAME.match(name):
                raise UserError(f"experiment {self.name!r}: bad cell name {name!r} (letters, digits, _ . - only)")
            if not isinstance(overrides, (list, tuple)) or not all(isinstance(o, str) for o in overrides):
                raise UserError(f"experiment {self.name!r}: cell {name!r} must map to a list of 'key=value' strings")
        return {name: list(overrides) for name, overrides in cells.items()}

    def configs(self, scale: str) -> dict[str, Config]:
        """Resolve every cell (so a bad cell fails before anything trains)."""
        out = {}
        for name, overrides in self.cells(scale).items():
            try:
                out[name] = resolve(scale, overrides)
            except UserError as e:
                raise UserError(f"experiment {self.name!r}, cell {name!r}: {e}") from None
        return out


def list_experiments() -> list[str]:
    return sorted(p.stem for p in experiments_dir().glob("*.py") if not p.stem.startswith("_"))


def load_experiment(name_or_path: str) -> Experiment:
    """Load `experiments/NAME.py` by name, or an experiment file by path."""
    path = Path(name_or_path)
    if not (path.suffix == ".py" and path.is_file()):
        path = experiments_dir() / f"{name_or_path}.py"
    if not path.is_file():
        raise UserError(f"unknown experiment {name_or_path!r}; allowed: {', '.join(list_experiments()) or '(none)'} or a path to a .py file")
    spec = importlib.util.spec_from_file_location(f"cfm_jax_experiment_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise UserError(f"experiment file {str(path)!r} does not load: {type(e).__name__}: {e}") from None
    cells_fn = getattr(module, "cells", None)
    if not callable(cells_fn):
        raise UserError(f"experiment file {str(path)!r} defines no cells(scale) function")
    columns = getattr(module, "COLUMNS", ())
    if not isinstance(columns, (list, tuple)) or not all(isinstance(c, str) for c in columns):
        raise UserError(f"experiment file {str(path)!r}: COLUMNS must be a list of metric names")
    analyses = getattr(module, "ANALYSES", ())
    from cfm_jax.harness.evaluate import ANALYSES as KNOWN

    if not isinstance(analyses, (list, tuple)) or any(a not in KNOWN for a in analyses):
        raise UserError(f"experiment file {str(path)!r}: ANALYSES must list some of {', '.join(KNOWN)}")
    return Experiment(path.stem, path, cells_fn, tuple(columns), (module.__doc__ or "").strip(), tuple(analyses))
