"""Per-cell learning-rate selection for experiments with LR_GRID (Zoology's protocol: each cell at the
learning rate whose tuning run, seed 0, has the best validation value).

    pick_lrs(experiment, scale, find) -> {base: {"scores": {lr: value or None}, "lr": best or None}}

`find(run_name, config)` returns the directory of a finished run of that config (a workdir or a
committed record) or None; a cell's lr is picked only once every one of its tuning runs finished.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

from cfm_jax import workdir as wd
from cfm_jax.harness import records
from cfm_jax.harness.experiments import Experiment


def metric_of(run_dir: Path, metric: str) -> float | None:
    from cfm_jax.harness.report import _numeric, flatten_result

    value = flatten_result(records.read_json(Path(run_dir) / wd.EVAL) or {}).get(metric)
    return float(value) if _numeric([value]) else None


def pick_lrs(experiment: Experiment, scale: str, find: Callable[[str, object], Path | None]) -> dict[str, dict]:
    metric, mode = experiment.select_for(scale)
    configs = experiment.configs(scale)  # the tuning runs
    out = {}
    for base in experiment.base_cells(scale):
        runs = {lr: find(name := experiment.lr_name(base, lr, 0), configs[name]) for lr in experiment.lr_grid_for(scale)}
        scores = {lr: metric_of(run, metric) if run is not None else None for lr, run in runs.items()}
        done = [lr for lr, v in scores.items() if v is not None and math.isfinite(v)]
        finished = all(run is not None for run in runs.values())
        best = None
        if finished and done:  # ties go to the smaller lr (the grid's order otherwise)
            best = (max if mode == "max" else min)(done, key=lambda lr: (scores[lr], -lr if mode == "max" else lr))
        out[base] = {"scores": scores, "lr": best, "all_diverged": finished and not done}
    return out


def picks_only(picked: dict[str, dict]) -> dict[str, float]:
    return {base: p["lr"] for base, p in picked.items() if p["lr"] is not None}
