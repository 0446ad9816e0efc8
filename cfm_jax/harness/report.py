"""`cfm-jax report`: read a sweep's eval.json files into experiments/results/NAME[_SCALE].md, .csv
and (if the experiment draws one) .png.

Every number comes from a workdir's eval.json. The .csv has one row per run (every seed); the .md
table has one row per cell, mean +- std over seeds when the experiment runs several, with the command
that reproduces it; the experiment's `reading(table)` paragraph, computed from the same numbers,
closes the file.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import shlex
from pathlib import Path

from cfm_jax import workdir as wd
from cfm_jax.errors import UserError
from cfm_jax.harness.experiments import Experiment
from cfm_jax.harness.sweep import cell_workdir

BASE_COLUMNS = ("params_total", "params_non_embedding", "step")
SEED_SUFFIX = re.compile(r"\.s\d+$")  # NAME.sK: seed K of cell NAME
PROMOTED = ("metrics",)  # sections whose keys are used without a prefix
SKIPPED = ("sets",)  # repeated in `metrics`


def results_stem(name: str, scale: str) -> str:
    """cpu is the scale committed tables are made at; other scales get a suffix."""
    return name if scale == "cpu" else f"{name}_{scale}"


def cell_command(workdir: Path, scale: str, overrides: list[str]) -> str:
    args = " ".join(shlex.quote(o) for o in overrides)
    return f"cfm-jax train --workdir {workdir} --scale {scale} {args} && cfm-jax eval --workdir {workdir}"


def flatten_result(result: dict) -> dict:
    """eval.json -> {path: scalar}: `metrics` entries as they are, other dicts as "a/b/c"."""
    flat: dict = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}/{k}" if prefix else str(k), v)
        elif isinstance(value, (int, float, str, bool)) or value is None:
            flat[prefix] = value

    for key, value in result.items():
        if key in PROMOTED:
            flat.update({k: v for k, v in value.items()})
        elif key not in SKIPPED:
            walk(key, value)
    return flat


def collect_runs(experiment: Experiment, scale: str, runs_dir: Path) -> list[dict]:
    """One row per run: {"cell", "base", flattened eval.json..., "command"} or a status."""
    rows = []
    bases = experiment.base_cells(scale)
    for cell, overrides in experiment.cells(scale).items():
        workdir = cell_workdir(runs_dir, experiment.name, scale, cell)
        base = cell if cell in bases else SEED_SUFFIX.sub("", cell)
        row = {"cell": cell, "base": base}
        if (workdir / wd.EVAL).exists():
            row.update(flatten_result(json.loads((workdir / wd.EVAL).read_text())))
        else:
            row["status"] = "not run" if not workdir.exists() else "unfinished"
        row["command"] = cell_command(workdir, scale, overrides)
        rows.append(row)
    return rows


def aggregate(rows: list[dict], columns: list[str]) -> list[dict]:
    """Rows of one base cell -> one row: numeric columns as mean (key) and std (key + "_std")."""
    table = []
    for base in dict.fromkeys(r["base"] for r in rows):
        group = [r for r in rows if r["base"] == base]
        done = [r for r in group if "status" not in r]
        out = {"cell": base, "seeds": len(done), "command": group[0]["command"]}
        if len(done) < len(group):
            out["status"] = f"{len(group) - len(done)} of {len(group)} runs missing"
        for col in columns:
            values = [r.get(col) for r in done if r.get(col) is not None]
            if values and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                mean = sum(values) / len(values)
                out[col] = mean
                if len(values) > 1:
                    out[col + "_std"] = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
            elif values:
                out[col] = values[0]
        table.append(out)
    return table


def _fmt(value) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e12:
        return str(int(value))  # counts (parameters, steps, bytes) stay exact
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def to_markdown(columns: list[str], table: list[dict]) -> str:
    def cell(col: str, row: dict) -> str:
        if col == "command":
            return f"`{row[col]}`" if row.get(col) else ""
        text = _fmt(row.get(col))
        if text and row.get(col + "_std"):  # no "± 0" for values every seed shares
            text += f" ± {_fmt(row[col + '_std'])}"
        return text

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(c, r) for c in columns) + " |" for r in table]
    return "\n".join(lines) + "\n"


def to_csv(columns: list[str], rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _call_hook(experiment: Experiment, name: str, fn, *args):
    """Run an experiment file's plot/reading; its bugs are the user's input, reported in one line."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"experiment {experiment.name!r}: {name}() failed: {type(e).__name__}: {e}") from None


def report(experiment: Experiment, scale: str, runs_dir: Path, results_dir: Path) -> tuple[Path, str]:
    """Write NAME[_SCALE].md, .csv (and .png) under results_dir; returns (md path, markdown table)."""
    rows = collect_runs(experiment, scale, runs_dir)
    metric_columns = experiment.columns_for(scale) or list(dict.fromkeys(
        k for r in rows for k in r if "/" in k and not k.startswith(("stats/", "state_bytes/", "corpus/"))))
    columns = [c for c in (*BASE_COLUMNS, *metric_columns) if c not in ("cell",)]
    table = aggregate(rows, columns)
    md_columns = ["cell", *(["seeds"] if experiment.seeds > 1 else []), *columns,
                  *(["status"] if any("status" in t for t in table) else []), "command"]
    markdown = to_markdown(md_columns, table)
    stem = results_stem(experiment.name, scale)
    results_dir = Path(results_dir)
    title = experiment.doc.splitlines()[0] if experiment.doc else experiment.name
    seeds_note = (f" Each cell ran with `train.seed` = 0..{experiment.seeds - 1} (the command shows seed 0); "
                  "values are mean ± sample std over seeds.") if experiment.seeds > 1 else ""
    parts = [
        f"# {title}\n",
        f"Scale `{scale}`. Regenerate with:\n\n"
        f"    cfm-jax sweep {experiment.name} --scale {scale} && cfm-jax report {experiment.name} --scale {scale}\n",
        f"Every number below is read from `{Path(runs_dir) / experiment.name / scale}/<cell>/eval.json`.{seeds_note}\n",
        markdown,
    ]
    if experiment.plot_fn is not None and any("status" not in r for r in rows):
        png = results_dir / f"{stem}.png"
        results_dir.mkdir(parents=True, exist_ok=True)
        _call_hook(experiment, "plot", experiment.plot_fn, table, png)
        parts.append(f"![{experiment.name}]({png.name})\n")
    if experiment.reading_fn is not None and any("status" not in r for r in rows):
        parts.append("## Reading\n\n" + _call_hook(experiment, "reading", experiment.reading_fn, table).strip() + "\n")
    md_path = results_dir / f"{stem}.md"
    wd.write_atomic(md_path, "\n".join(parts))
    csv_columns = ["cell", *columns, *(["status"] if any("status" in r for r in rows) else []), "command"]
    wd.write_atomic(results_dir / f"{stem}.csv", to_csv(csv_columns, rows))
    return md_path, markdown
