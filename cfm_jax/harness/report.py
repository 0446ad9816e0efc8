"""`cfm-jax report`: read a sweep's eval.json files into experiments/results/NAME[_SCALE].md and .csv.

One row per cell, in the experiment's cell order; every number comes from a workdir's eval.json, and
each row carries the command that reproduces it.
"""

from __future__ import annotations

import csv
import io
import json
import shlex
from pathlib import Path

from cfm_jax import workdir as wd
from cfm_jax.harness.experiments import Experiment
from cfm_jax.harness.sweep import cell_workdir

BASE_COLUMNS = ("params_total", "params_non_embedding", "step")


def results_stem(name: str, scale: str) -> str:
    """cpu is the scale committed tables are made at; other scales get a suffix."""
    return name if scale == "cpu" else f"{name}_{scale}"


def cell_command(workdir: Path, scale: str, overrides: list[str]) -> str:
    args = " ".join(shlex.quote(o) for o in overrides)
    return f"cfm-jax train --workdir {workdir} --scale {scale} {args} && cfm-jax eval --workdir {workdir}"


def collect_rows(experiment: Experiment, scale: str, runs_dir: Path) -> tuple[list[str], list[dict]]:
    """(columns, rows) with rows[i] = {"cell", metrics..., "command"}; missing cells have status."""
    rows, seen = [], []
    for cell, overrides in experiment.cells(scale).items():
        workdir = cell_workdir(runs_dir, experiment.name, scale, cell)
        row = {"cell": cell}
        eval_path = workdir / wd.EVAL
        if eval_path.exists():
            result = json.loads(eval_path.read_text())
            row.update({k: result[k] for k in BASE_COLUMNS if k in result})
            row.update(result.get("metrics", {}))
            seen.extend(k for k in result.get("metrics", {}) if k not in seen)
        else:
            row["status"] = "not run" if not workdir.exists() else "unfinished"
        row["command"] = cell_command(workdir, scale, overrides)
        rows.append(row)
    metric_columns = list(experiment.columns) or seen
    columns = ["cell", *BASE_COLUMNS, *metric_columns]
    if any("status" in r for r in rows):
        columns.append("status")
    return columns + ["command"], rows


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def to_markdown(columns: list[str], rows: list[dict]) -> str:
    def cell(col, row):
        text = _fmt(row.get(col))
        return f"`{text}`" if col == "command" and text else text

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(c, r) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def to_csv(columns: list[str], rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def report(experiment: Experiment, scale: str, runs_dir: Path, results_dir: Path) -> tuple[Path, str]:
    """Write NAME[_SCALE].md and .csv under results_dir; returns (md path, markdown table)."""
    columns, rows = collect_rows(experiment, scale, runs_dir)
    table = to_markdown(columns, rows)
    stem = results_stem(experiment.name, scale)
    title = experiment.doc.splitlines()[0] if experiment.doc else experiment.name
    md = (
        f"# {title}\n\n"
        f"Scale `{scale}`. Regenerate with:\n\n"
        f"    cfm-jax sweep {experiment.name} --scale {scale} && cfm-jax report {experiment.name} --scale {scale}\n\n"
        f"Every number below is read from `{Path(runs_dir) / experiment.name / scale}/<cell>/eval.json`.\n\n"
        f"{table}"
    )
    md_path = Path(results_dir) / f"{stem}.md"
    wd.write_atomic(md_path, md)
    wd.write_atomic(Path(results_dir) / f"{stem}.csv", to_csv(columns, rows))
    return md_path, table
