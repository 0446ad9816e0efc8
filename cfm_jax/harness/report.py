"""`cfm-jax report`: read a sweep's runs into experiments/results/NAME[_SCALE].md, .csv, .png (the
experiment's own plot), _curves.png (learning curves) and the committed run records.

Every number comes from a run's eval.json: the local workdir (runs/EXP/SCALE/CELL) where it holds a
finished run of the cell's current config, else the committed record (experiments/results/runs/...,
see records.py), else a finished run of the identical config made for another experiment (shared, not
retrained). Runs read from local workdirs or shared are exported as this experiment's records, so the
committed files regenerate from git alone. The .csv has one row per run (every seed); the .md one row per cell with
mean, 95 % interval, per-seed values, then the declared comparisons with their tests (stats.py), the
experiment's plot, the curves, and its reading, which receives the test results.
"""

from __future__ import annotations

import csv
import datetime
import io
import math
import re
import shlex
import sys
from pathlib import Path

from cfm_jax import provenance
from cfm_jax import workdir as wd
from cfm_jax.errors import UserError
from cfm_jax.harness import lr_grid, records, stats
from cfm_jax.harness.experiments import Experiment
from cfm_jax.harness.records import cell_workdir

BASE_COLUMNS = ("params_total", "params_non_embedding", "step")
SEED_SUFFIX = re.compile(r"\.s(\d+)$")  # NAME.sK: seed K of cell NAME
PROMOTED = ("metrics",)  # sections whose keys are used without a prefix
SKIPPED = ("sets", "provenance")  # repeated in `metrics` / not a measurement
MAX_SEEDS_SHOWN = 5  # per-seed values are written into the md table up to this many seeds


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


def collect_runs(experiment: Experiment, scale: str, runs_dir: Path, results_dir: Path,
                 picks: dict[str, float] | None = None) -> list[dict]:
    """One row per run: {"cell", "base", "seed", flattened eval.json..., "command"} or a status.
    Private keys: "_metrics" (down-sampled rows for the curves), "_config" (config.json), "_workdir"."""
    rows = []
    bases = experiment.base_cells(scale)
    configs = experiment.configs(scale, picks)
    shared = records.identical_finder(experiment.name, scale, runs_dir, results_dir)
    for cell, overrides in experiment.cells(scale, picks).items():
        workdir = cell_workdir(runs_dir, experiment.name, scale, cell)
        record = records.record_dir(results_dir, experiment.name, scale, cell)
        m = SEED_SUFFIX.search(cell)
        base = cell if cell in bases else experiment.base_of(cell) if experiment.lr_grid else SEED_SUFFIX.sub("", cell)
        row = {"cell": cell, "base": base, "seed": int(m.group(1)) if m and cell not in bases else 0}
        source = next((d for d in (workdir, record) if records.finished(d, configs[cell])), None) or shared(configs[cell])
        stopped = next((d for d in (workdir, record) if records.diverged(d, configs[cell])), None)
        if source is not None:
            result = records.read_json(source / wd.EVAL)
            row.update(flatten_result(result))
            row["_eval_prov"] = result.get("provenance", {})
        elif stopped is not None:
            row["status"] = "diverged"
        elif (workdir / wd.EVAL).exists() or (record / wd.EVAL).exists():
            row["status"] = "stale (config changed since it ran)"
        else:
            row["status"] = "not run" if not workdir.exists() else "unfinished"
        if source or stopped:
            found = source or stopped
            # "shared": the same run made for another experiment, exported as this one's record too
            row["source"] = "runs" if found == workdir else "record" if found == record else "shared"
            row["_config"] = records.read_json(found / wd.CONFIG)
            row["_metrics"] = records.downsample(wd.read_metrics(found))
            row["_workdir"] = found
        row["command"] = cell_command(workdir, scale, overrides)
        rows.append(row)
    return rows


def lr_table(experiment: Experiment, scale: str, picked: dict[str, dict]) -> str:
    """Markdown: each cell's SELECT value at every grid lr (seed 0) and the lr picked."""
    metric, mode = experiment.select_for(scale)
    grid = experiment.lr_grid_for(scale)
    lines = [f"| cell | {' | '.join(f'lr {lr:g}' for lr in grid)} | picked |", "|" + "---|" * (len(grid) + 2)]
    for base, p in picked.items():
        cells = ["not run / diverged" if p["scores"][lr] is None else _short(p["scores"][lr]) for lr in grid]
        pick = "pending" if p["lr"] is None else f"{p['lr']:g}"
        lines.append(f"| {base} | {' | '.join(cells)} | {pick} |")
    return (f"Learning rate per cell: each grid value trained once (seed 0); the one with the {'highest' if mode == 'max' else 'lowest'} "
            f"`{metric}` is picked and the cell's seeds run at it.\n\n" + "\n".join(lines) + "\n")


def _numeric(values) -> bool:
    return bool(values) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def is_accuracy(column: str) -> bool:
    return column.endswith("accuracy")


def aggregate(rows: list[dict], columns: list[str], solved_at: float | None = None) -> list[dict]:
    """Rows of one base cell -> one row: numeric columns as mean (key), plus key + "_std", "_ci",
    "_values" (per seed), "_median", and for accuracy columns "_solved" (seeds >= solved_at)."""
    table = []
    for base in dict.fromkeys(r["base"] for r in rows):
        group = [r for r in rows if r["base"] == base]
        done = [r for r in group if "status" not in r]
        out = {"cell": base, "seeds": len(done), "command": group[0]["command"]}
        diverged = sum(r.get("status") == "diverged" for r in group)
        if len(done) + diverged < len(group):
            out["status"] = f"{len(group) - len(done) - diverged} of {len(group)} runs missing"
        if diverged:
            out["status"] = ", ".join(filter(None, [out.get("status"), f"{diverged} of {len(group)} runs diverged (left out)"]))
        for col in columns:
            values = [r.get(col) for r in done if r.get(col) is not None]
            if _numeric(values):
                s = stats.summarize(values, solved_at if is_accuracy(col) else None)
                out[col] = s["mean"]
                out[col + "_values"] = s["values"]
                out[col + "_median"] = s["median"]
                if len(values) > 1:
                    out[col + "_std"], out[col + "_ci"] = s["std"], s["ci"]
                if "solved" in s:
                    out[col + "_solved"] = s["solved"]
            elif values:
                out[col] = values[0]
        table.append(out)
    return table


def run_comparisons(experiment: Experiment, scale: str, rows: list[dict]) -> list[dict]:
    """Each declared comparison tested on the seeds both cells finished; Holm-adjusted over the table.
    Returns one dict per comparison: its fields, stats.compare's result, p_holm, verdict, text."""
    out, declared = [], experiment.comparisons_for(scale)
    for c in declared:
        side = [{r["seed"]: r.get(col) for r in rows if r["base"] == cell and "status" not in r}
                for cell, col in zip((c.a, c.b), c.columns)]
        seeds = sorted(s for s in side[0] if s in side[1] and _numeric([side[0][s], side[1][s]])
                       and all(math.isfinite(v) for v in (side[0][s], side[1][s])))
        a, b = [side[0][s] for s in seeds], [side[1][s] * (1 + c.margin) for s in seeds]
        solved = experiment.solved_at if all(is_accuracy(col) for col in c.columns) else None
        bimodal = stats.is_bimodal(a, solved) or stats.is_bimodal(b, solved)
        result = stats.compare(a, b, bimodal=bimodal) if seeds else {
            "n": 0, "mean_a": math.nan, "mean_b": math.nan, "diff": math.nan, "ci": (math.nan, math.nan),
            "test": "none", "p": math.nan, "p_floor": math.nan}
        out.append({"a": c.a, "b": c.b, "b_label": c.b_label, "column": c.label, "expect": c.expect, "claim": c.claim, **result})
    for result, p in zip(out, stats.holm([r["p"] for r in out])):
        result["p_holm"] = p
    for result, c in zip(out, declared):
        result["verdict"] = stats.verdict(result, c.expect) if result["n"] else "not run"
        result["text"] = stats.wording(result, c) if result["n"] else f"{c.a} vs {c.b_label} on {c.label}: not run"
    return out


def _final_rows(experiment: Experiment, scale: str, all_rows: list[dict], picked: dict[str, dict]) -> list[dict]:
    """With LR_GRID: each base cell's seeds at its picked lr; a cell not picked yet is one
    placeholder row (status) so the table still lists it."""
    by_name = {r["cell"]: r for r in all_rows}
    out = []
    for base, p in picked.items():
        if p["lr"] is None:
            status = "every grid lr diverged" if p.get("all_diverged") else "lr not picked yet (tuning runs unfinished)"
            out.append({"cell": base, "base": base, "seed": 0, "status": status,
                        "command": by_name[experiment.lr_name(base, experiment.lr_grid_for(scale)[0], 0)]["command"]})
            continue
        out += [by_name[experiment.lr_name(base, p["lr"], k)] for k in range(experiment.seeds_for(scale, base))]
    return out


def _fmt(value) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e12:
        return str(int(value))  # counts (parameters, steps, bytes) stay exact
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def _short(value: float) -> str:
    return "nan" if isinstance(value, float) and math.isnan(value) else f"{value:.3g}"


def format_value(row: dict, col: str, solved_at: float) -> str:
    """'mean [lo, hi] (v0 / v1 / v2)'; accuracy adds 'median m, k/n >= solved'. One value every
    seed shares (a parameter count) is written once."""
    text = _fmt(row.get(col))
    values = row.get(col + "_values")
    if not text or not values or len(set(values)) == 1:
        return text
    lo, hi = row[col + "_ci"]
    text += f" [{_short(lo)}, {_short(hi)}]"
    if len(values) <= MAX_SEEDS_SHOWN:
        text += " (" + " / ".join(_short(v) for v in values) + ")"
    if col + "_solved" in row:
        text += f" med {_short(row[col + '_median'])}, {row[col + '_solved']}/{len(values)} ≥ {solved_at:g}"
    return text


def to_markdown(columns: list[str], table: list[dict], solved_at: float = 0.9) -> str:
    def cell(col: str, row: dict) -> str:
        if col == "command":
            return f"`{row[col]}`" if row.get(col) else ""
        return format_value(row, col, solved_at)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(c, r) for c in columns) + " |" for r in table]
    return "\n".join(lines) + "\n"


def comparisons_markdown(tests: list[dict]) -> str:
    head = ("| claim | a | b | column | expected | mean a | mean b | a - b [95 % CI] | n | test | p | p (Holm) "
            "| verdict |\n|" + "---|" * 13)
    lines = [head]
    for t in tests:
        lo, hi = t["ci"]
        floor = f" (min {_short(t['p_floor'])})" if t["test"] == "sign-flip" else ""
        lines.append(
            f"| {t['claim']} | {t['a']} | {t.get('b_label', t['b'])} | {t['column']} | a {'>' if t['expect'] == 'greater' else '<'} b "
            f"| {_short(t['mean_a'])} | {_short(t['mean_b'])} | {_short(t['diff'])} [{_short(lo)}, {_short(hi)}] "
            f"| {t['n']} | {t['test']} | {_short(t['p'])}{floor} | {_short(t['p_holm'])} | {t['verdict']} |")
    return "\n".join(lines) + "\n"


def covered_seconds(ends: list[str], durations: list[float]) -> float:
    """Length of the union of the intervals [end - duration, end] (ends as provenance UTC times): the
    machine time a set of runs took, counting runs that ran side by side once. A resumed run's interval
    is placed as if it ran in one piece, so this is an estimate."""
    stamps = [datetime.datetime.strptime(e, "%Y-%m-%dT%H:%M:%SZ").timestamp() for e in ends]
    total, reach = 0.0, -math.inf
    for start, end in sorted((t - d, t) for t, d in zip(stamps, durations)):
        total += max(0.0, end - max(start, reach))
        reach = max(reach, end)
    return total


def provenance_line(rows: list[dict]) -> tuple[str, str | None]:
    """('Runs: commit ... on ..., dates ...', warning or None) from the finished runs' config/eval."""
    done = [r for r in rows if "status" not in r]
    if not done:
        return "No finished runs.", None
    commits, devices, dates, versions = {}, set(), set(), set()
    for r in done:
        cfg = r.get("_config") or {}
        prov = cfg.get("provenance")
        label = provenance.commit_label(prov) if prov else (cfg.get("git_commit", "unknown")[:7] + " (old record)")
        commits[label] = commits.get(label, 0) + 1
        devices.add((prov or {}).get("device") or cfg.get("device", "unknown"))
        if prov:
            versions.add(f"jax {prov['versions'].get('jax')}, flax {prov['versions'].get('flax')}")
        if t := r.get("_eval_prov", {}).get("time"):
            dates.add(t[:10])
    when = (min(dates) if len(dates) == 1 else f"{min(dates)} to {max(dates)}") if dates else "date not recorded"
    # Compute spent: each run's training wall seconds (its last metrics row) plus its evaluation.
    timed = [r for r in done if r.get("_metrics")]
    spent = [(r["_metrics"][-1].get("seconds") or 0) + (r.get("eval_seconds") or 0) for r in timed]
    ends = [r.get("_eval_prov", {}).get("time") for r in timed]
    clock = covered_seconds(ends, spent) if spent and all(ends) else None
    compute = ""
    if spent:
        compute = (f" Compute: the runs' own wall times (training + evaluation) sum to {sum(spent) / 60:.0f} minutes "
                   "(runs that shared the cores with another process count their whole wall time)")
        if clock is not None:
            compute += (f"; on the clock, each run ending when its evaluation did, they cover about {clock / 60:.0f} "
                        "minutes of the machine's time (runs sharing the cores overlap)")
        compute += "."
    line = (f"Runs: {len(done)}, trained at commit {', '.join(f'{c} ({n} runs)' if len(commits) > 1 else c for c, n in commits.items())}"
            f"; evaluated {when}; device {', '.join(sorted(devices))}"
            + (f"; {'; '.join(sorted(versions))}" if versions else "") + "." + compute)
    warning = None
    if len(commits) > 1 or any(c.endswith("dirty") for c in commits):
        warning = (f"warning: this table mixes runs from {len(commits)} code states ({', '.join(commits)})"
                   if len(commits) > 1 else f"warning: runs trained from uncommitted code ({next(iter(commits))})")
    return line, warning


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


HOW_TO_READ = (
    "Each value: mean over seeds [95 % Student-t interval] (per-seed values, seed 0 first); accuracy columns "
    "add the median and how many seeds reach the experiment's `SOLVED` threshold. A value without an interval "
    "is the same in every seed. Comparisons pair the two cells seed by seed (same seed = same data order and "
    "initialisation): paired t test, or an exact sign-flip test where an accuracy is bimodal across seeds; "
    "p-values are Holm-adjusted over this table, and a difference counts as found when the adjusted p < "
    f"{stats.ALPHA}.")


def report(experiment: Experiment, scale: str, runs_dir: Path, results_dir: Path, force: bool = False) -> tuple[Path, str]:
    """Write NAME[_SCALE].md, .csv (and .png, _curves.png) under results_dir and export the runs'
    records; returns (md path, markdown table). Refuses (UserError) to replace an existing table with
    one that has runs missing, unless `force`."""
    results_dir = Path(results_dir)
    picked = picks = None
    if experiment.lr_grid:
        picked = lr_grid.pick_lrs(experiment, scale, records.finder(experiment.name, scale, runs_dir, results_dir))
        picks = lr_grid.picks_only(picked)
    all_rows = collect_runs(experiment, scale, runs_dir, results_dir, picks)
    rows = _final_rows(experiment, scale, all_rows, picked) if experiment.lr_grid else all_rows
    stem = results_stem(experiment.name, scale)
    md_path = results_dir / f"{stem}.md"
    missing = [r["cell"] for r in rows if "status" in r and r["status"] not in ("diverged", "every grid lr diverged")]
    if missing and md_path.exists() and not force:
        first = next(r for r in rows if r["cell"] in missing)
        raise UserError(f"{len(missing)} of {len(rows)} runs of {experiment.name!r} at scale {scale!r} are not finished "
                        f"in {Path(runs_dir) / experiment.name / scale} nor in the committed records (e.g. {first['cell']}: "
                        f"{first['status']}); refusing to replace {md_path} with a partial table (--force writes it anyway)")
    metric_columns = experiment.columns_for(scale) or list(dict.fromkeys(
        k for r in rows for k in r if "/" in k and not k.startswith(("stats/", "state_bytes/", "corpus/", "_"))))
    columns = [c for c in (*BASE_COLUMNS, *metric_columns) if c not in ("cell",)]
    table = aggregate(rows, columns, experiment.solved_at)
    tests = run_comparisons(experiment, scale, rows)
    if picked is not None:
        for row in table:
            row["lr"] = picked.get(row["cell"], {}).get("lr")
    md_columns = ["cell", "seeds", *(["lr"] if picked is not None else []), *columns, *(["status"] if any("status" in t for t in table) else []), "command"]
    markdown = to_markdown(md_columns, table, experiment.solved_at)
    title = experiment.doc.splitlines()[0] if experiment.doc else experiment.name
    prov_line, warning = provenance_line(rows)
    if warning:
        print(warning, file=sys.stderr)
    counts = experiment.seed_counts(scale)
    seeds_note = ("n = 1 seed per cell: no spread is measured, so no difference in this table is established."
                  if counts == [1] else
                  f"n = {counts[0]} seeds per cell (`train.seed` = 0..{counts[0] - 1}; the command shows seed 0)."
                  if len(counts) == 1 else
                  f"n = {' or '.join(map(str, counts))} seeds per cell, as the seeds column says (`train.seed` = 0..n-1; "
                  "the command shows seed 0; a comparison pairs the seeds both cells ran).")
    finished = any("status" not in r for r in rows)
    parts = [
        f"# {title}\n",
        f"Scale `{scale}`, {seeds_note} Regenerate this file from the committed run records (no training):\n\n"
        f"    cfm-jax report {experiment.name} --scale {scale}\n\n"
        f"or retrain every cell: `cfm-jax sweep {experiment.name} --scale {scale} --retrain && cfm-jax report "
        f"{experiment.name} --scale {scale}`.\n",
        prov_line + (f" {warning[0].upper()}{warning[1:]}." if warning else "")
        + f" Each run's record: `{records.RECORDS}/{experiment.name}/{scale}/<cell>/` beside this file.\n",
        HOW_TO_READ + "\n",
        markdown,
    ]
    if picked is not None:
        parts.append("## Learning rates\n\n" + lr_table(experiment, scale, picked))
    if tests:
        parts.append("## Comparisons\n\n" + comparisons_markdown(tests))
    if experiment.plot_fn is not None and finished:
        png = results_dir / f"{stem}.png"
        results_dir.mkdir(parents=True, exist_ok=True)
        _call_hook(experiment, "plot", experiment.plot_fn, table, png)
        parts.append(f"![{experiment.name}]({png.name})\n")
    if finished:
        from cfm_jax.harness.plots import learning_curves

        curves = results_dir / f"{stem}_curves.png"
        results_dir.mkdir(parents=True, exist_ok=True)
        if learning_curves(rows, curves, title=f"{experiment.name} ({scale})"):
            parts.append(f"Learning curves (mean over seeds, band: lowest to highest seed):\n\n![curves]({curves.name})\n")
    if experiment.reading_fn is not None and finished:
        parts.append("## Reading\n\n" + _call_hook(experiment, "reading", experiment.reading_fn, table, tests).strip() + "\n")
    wd.write_atomic(md_path, "\n".join(parts))
    csv_columns = ["cell", "seed", *columns, *(["status"] if any("status" in r for r in all_rows) else []), "command"]
    wd.write_atomic(results_dir / f"{stem}.csv", to_csv(csv_columns, all_rows))
    for r in all_rows:
        if r.get("source") in ("runs", "shared"):
            records.export(r["_workdir"], records.record_dir(results_dir, experiment.name, scale, r["cell"]))
    return md_path, markdown

