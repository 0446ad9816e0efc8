"""`cfm-jax sweep`: train then evaluate every cell of an experiment, each in its own workdir.

A cell whose workdir already holds eval.json is skipped, so rerunning a sweep finishes what is left.
"""

from __future__ import annotations

import sys
from pathlib import Path

from cfm_jax import workdir as wd
from cfm_jax.errors import TrainingDiverged
from cfm_jax.harness.evaluate import evaluate
from cfm_jax.harness.experiments import Experiment
from cfm_jax.train import train


def cell_workdir(runs_dir: Path, experiment: str, scale: str, cell: str) -> Path:
    return Path(runs_dir) / experiment / scale / cell


def sweep(experiment: Experiment, scale: str, runs_dir: Path, progress: bool = True) -> list[str]:
    """Run every unfinished cell; returns the names of cells that failed (diverged)."""
    configs = experiment.configs(scale)
    failed = []
    for i, (cell, cfg) in enumerate(configs.items(), 1):
        workdir = cell_workdir(runs_dir, experiment.name, scale, cell)
        if (workdir / wd.EVAL).exists():
            print(f"[{i}/{len(configs)}] {cell}: done, skipped", file=sys.stderr)
            continue
        print(f"[{i}/{len(configs)}] {cell}: training in {workdir}", file=sys.stderr)
        try:
            train(cfg, workdir, progress=progress)
        except TrainingDiverged as e:
            print(f"[{i}/{len(configs)}] {cell}: FAILED: {e}", file=sys.stderr)
            failed.append(cell)
            continue
        evaluate(workdir)
    return failed
