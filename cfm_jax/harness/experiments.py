"""Experiment files: `experiments/NAME.py` defines the cells of one table.

An experiment file has a docstring (command, expected runtime, expected result) and

    def cells(scale: str) -> dict[str, list[str]]:   # cell name -> config overrides
    COLUMNS = ["val/bits_per_byte", ...]              # optional: eval.json values shown (or COLUMNS(scale))
    ANALYSES = ["cett"]                               # optional: `eval --analysis` run on every cell
    SEEDS = 5                                         # optional: each cell run with train.seed=0..4
                                                      # (or SEEDS(scale, cell) -> int: per cell)
    SOLVED = 0.9                                      # optional: accuracy at which a seed counts as solved
    COMPARISONS = [Comparison("a", "b", "val/loss", "less", "claim")]  # optional (or COMPARISONS(scale))
    LR_GRID = [1e-3, 3e-3, 1e-2]                      # optional (or LR_GRID(scale)): tune each cell's lr
    SELECT = ("len64/accuracy", "max")                # with LR_GRID: the validation value that picks it
    def plot(table, path): ...                        # optional: draw the aggregated table to a .png
    def reading(table, tests) -> str: ...             # optional: plain-language reading of the numbers

Every cell is an ordinary training run: `cfm-jax train --scale SCALE OVERRIDES...`. With SEEDS = n
a cell NAME runs as NAME.s0 .. NAME.s{n-1}, and the report shows per column the mean, its 95 % t
interval and (n <= 5) every seed's value; accuracy columns also the median and how many seeds reach
SOLVED. COMPARISONS are the differences the reading relies on (cfm_jax.harness.stats.Comparison: cell
a vs cell b on a column, with the direction the literature expects); the report tests each one on the
per-seed pairs (same seed = same data order and init), corrects for their number (Holm) and passes the
results to `reading(table, tests)`, which may state a difference only where its test passed. COLUMNS name
values of eval.json by path: the `metrics` entries directly ("val/loss", "len256/accuracy"), other
values as "section/key/..." ("stats/ffn/activation_ratio", "cett/sparsity_at_cett_ppl1",
"state_bytes/512").

With LR_GRID, each cell first runs once per learning rate at seed 0 (NAME.lrV.s0, the tuning runs);
the lr whose tuning run has the best SELECT value (Zoology's protocol: best by validation accuracy) is
picked, and the cell's seeds run at it (NAME.lrV.s1 ...; its tuning run is seed 0). The table shows
each cell at its picked lr, and a tuning table shows every lr's value.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from cfm_jax.config import Config, resolve
from cfm_jax.errors import UserError
from cfm_jax.harness.stats import Comparison

SEED_RUN = re.compile(r"\.s\d+$")  # NAME.sK: seed K of cell NAME
LR_RUN = re.compile(r"\.lr[0-9.e+-]+$")  # NAME.lrV: NAME at learning rate V
CELL_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*$")  # no leading dot: '..' would leave the runs dir


def experiments_dir() -> Path:
    """`experiments/` of the current directory if present, else the one next to this package."""
    local = Path.cwd() / "experiments"
    return local if local.is_dir() else Path(__file__).resolve().parents[2] / "experiments"


@dataclass(frozen=True)
class Experiment:
    name: str
    path: Path
    cells_fn: Callable[[str], dict]
    columns: tuple[str, ...] | Callable[[str], list[str]]  # COLUMNS, or COLUMNS(scale)
    doc: str
    analyses: tuple[str, ...] = ()  # eval analyses run on every cell (ANALYSES in the file)
    seeds: int | Callable = 1  # SEEDS in the file, or SEEDS(scale, cell)
    plot_fn: Callable | None = None  # plot(table, path) in the file
    reading_fn: Callable | None = None  # reading(table, tests) -> str in the file
    solved_at: float = 0.9  # SOLVED in the file
    comparisons: tuple | Callable = ()  # COMPARISONS, or COMPARISONS(scale)
    lr_grid: tuple | Callable = ()  # LR_GRID, or LR_GRID(scale)
    select: tuple | Callable = ()  # SELECT = (metric, "max" | "min"), or SELECT(scale)

    def lr_grid_for(self, scale: str) -> list[float]:
        grid = self.lr_grid(scale) if callable(self.lr_grid) else self.lr_grid
        if not isinstance(grid, (list, tuple)) or not all(isinstance(v, (int, float)) and v > 0 for v in grid):
            raise UserError(f"experiment {self.name!r}: LR_GRID must be a list of learning rates > 0, not {grid!r}")
        return [float(v) for v in grid]

    def select_for(self, scale: str) -> tuple[str, str]:
        sel = self.select(scale) if callable(self.select) else self.select
        if not (isinstance(sel, (list, tuple)) and len(sel) == 2 and isinstance(sel[0], str) and sel[1] in ("max", "min")):
            raise UserError(f"experiment {self.name!r}: SELECT must be (metric, 'max' or 'min') with LR_GRID, not {sel!r}")
        return sel[0], sel[1]

    def seeds_for(self, scale: str, cell: str) -> int:
        """How many seeds the base cell `cell` runs with (0 .. n-1)."""
        try:
            n = self.seeds(scale, cell) if callable(self.seeds) else self.seeds
        except Exception as e:  # noqa: BLE001 - a bug in the experiment file is the user's input
            raise UserError(f"experiment {self.name!r}: SEEDS({scale!r}, {cell!r}) failed: {type(e).__name__}: {e}") from None
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise UserError(f"experiment {self.name!r}: SEEDS({scale!r}, {cell!r}) must be an int >= 1, not {n!r}")
        return n

    def seed_counts(self, scale: str) -> list[int]:
        """The distinct seed counts of the cells at this scale, ascending."""
        return sorted({self.seeds_for(scale, base) for base in self.base_cells(scale)})

    @staticmethod
    def lr_name(base: str, lr: float, seed: int) -> str:
        return f"{base}.lr{lr:g}.s{seed}"

    def base_of(self, run: str) -> str:
        """The base cell of a run name: NAME, NAME.sK or NAME.lrV.sK -> NAME."""
        return LR_RUN.sub("", SEED_RUN.sub("", run))

    def tuning_runs(self, scale: str) -> dict[str, list[str]]:
        """With LR_GRID: every base cell at every grid lr, seed 0."""
        return {self.lr_name(name, lr, 0): [*o, f"train.lr={lr:g}", "train.seed=0"]
                for name, o in self.base_cells(scale).items() for lr in self.lr_grid_for(scale)}

    def base_cells(self, scale: str) -> dict[str, list[str]]:
        """The cells as the file defines them, before seed expansion."""
        try:
            cells = self.cells_fn(scale)
        except Exception as e:  # a bug in the experiment file is the user's input
            raise UserError(f"experiment {self.name!r}: cells({scale!r}) failed: {type(e).__name__}: {e}") from None
        if not isinstance(cells, dict) or not cells:
            raise UserError(f"experiment {self.name!r}: cells() must return a non-empty dict name -> [overrides]")
        for name, overrides in cells.items():
            if not isinstance(name, str) or not CELL_NAME.match(name):
                raise UserError(f"experiment {self.name!r}: bad cell name {name!r} (letters, digits, _ . - only, not starting with .)")
            if not isinstance(overrides, (list, tuple)) or not all(isinstance(o, str) for o in overrides):
                raise UserError(f"experiment {self.name!r}: cell {name!r} must map to a list of 'key=value' strings")
        return {name: list(overrides) for name, overrides in cells.items()}

    def columns_for(self, scale: str) -> list[str]:
        return list(self.columns(scale) if callable(self.columns) else self.columns)

    def comparisons_for(self, scale: str) -> list[Comparison]:
        """The declared comparisons at this scale; each must name two cells of the table."""
        try:
            found = list(self.comparisons(scale) if callable(self.comparisons) else self.comparisons)
        except Exception as e:  # noqa: BLE001 - a bug in the experiment file is the user's input
            raise UserError(f"experiment {self.name!r}: COMPARISONS({scale!r}) failed: {type(e).__name__}: {e}") from None
        base = self.base_cells(scale)
        for c in found:
            if not isinstance(c, Comparison):
                raise UserError(f"experiment {self.name!r}: COMPARISONS must hold stats.Comparison items, not {c!r}")
            for cell in (c.a, c.b):
                if cell not in base:
                    raise UserError(f"experiment {self.name!r}: comparison names cell {cell!r}, which is not one of "
                                    f"its cells at scale {scale!r}: {', '.join(base)}")
        return found

    def cells(self, scale: str, picks: dict[str, float] | None = None) -> dict[str, list[str]]:
        """Every run: base cells, each expanded to NAME.sK with train.seed=K when SEEDS > 1. With LR_GRID:
        the tuning runs, and for each base cell in `picks` (base -> picked lr) its seeds at that lr."""
        base = self.base_cells(scale)
        if self.lr_grid:
            runs = self.tuning_runs(scale)
            for name, lr in (picks or {}).items():
                runs.update({self.lr_name(name, lr, k): [*base[name], f"train.lr={lr:g}", f"train.seed={k}"]
                             for k in range(self.seeds_for(scale, name))})
            return runs
        if self.seed_counts(scale) == [1]:
            return base
        return {f"{name}.s{k}": [*o, f"train.seed={k}"] for name, o in base.items()
                for k in range(self.seeds_for(scale, name))}

    def configs(self, scale: str, picks: dict[str, float] | None = None) -> dict[str, Config]:
        """Resolve every run (so a bad cell fails before anything trains)."""
        out = {}
        for name, overrides in self.cells(scale, picks).items():
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
    if not callable(columns) and (not isinstance(columns, (list, tuple)) or not all(isinstance(c, str) for c in columns)):
        raise UserError(f"experiment file {str(path)!r}: COLUMNS must be a list of metric names or a function of the scale")
    analyses = getattr(module, "ANALYSES", ())
    from cfm_jax.harness.evaluate import ANALYSES as KNOWN

    if not isinstance(analyses, (list, tuple)) or any(a not in KNOWN for a in analyses):
        raise UserError(f"experiment file {str(path)!r}: ANALYSES must list some of {', '.join(KNOWN)}")
    seeds = getattr(module, "SEEDS", 1)
    if not callable(seeds) and (isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1):
        raise UserError(f"experiment file {str(path)!r}: SEEDS must be an int >= 1 or a function of (scale, cell)")
    solved = getattr(module, "SOLVED", 0.9)
    if isinstance(solved, bool) or not isinstance(solved, (int, float)) or not 0 < solved <= 1:
        raise UserError(f"experiment file {str(path)!r}: SOLVED must be an accuracy in (0, 1], not {solved!r}")
    comparisons = getattr(module, "COMPARISONS", ())
    if not callable(comparisons) and not isinstance(comparisons, (list, tuple)):
        raise UserError(f"experiment file {str(path)!r}: COMPARISONS must be a list of stats.Comparison or a function of the scale")
    lr_grid, select = getattr(module, "LR_GRID", ()), getattr(module, "SELECT", ())
    if lr_grid and not select:
        raise UserError(f"experiment file {str(path)!r}: LR_GRID needs SELECT = (metric, 'max' or 'min') to pick the lr")
    hooks = {name: getattr(module, name, None) for name in ("plot", "reading")}
    return Experiment(path.stem, path, cells_fn, columns if callable(columns) else tuple(columns),
                      (module.__doc__ or "").strip(), tuple(analyses),
                      seeds, hooks["plot"], hooks["reading"], float(solved),
                      comparisons if callable(comparisons) else tuple(comparisons),
                      lr_grid if callable(lr_grid) else tuple(lr_grid), select)
