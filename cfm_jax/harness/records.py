"""Committed run records: what a table's runs leave in git, so the table can be regenerated (and its
sweep continued on another machine) without retraining.

    experiments/results/runs/<experiment>/<scale>/<cell>/config.json    the workdir's, as written
                                                        eval.json      the workdir's, as written
                                                        metrics.jsonl  down-sampled (curves only)

Checkpoints stay out of git. A record counts for a cell only while its config matches the cell's
current resolved config (apart from the keys a workdir may change on resume), so editing an experiment
file never silently reuses runs of another config.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cfm_jax import config as config_lib
from cfm_jax import workdir as wd
from cfm_jax.config import Config

RECORDS = "runs"  # under the results directory
MAX_TRAIN_ROWS = 60  # training rows kept per run (all validation rows are kept)
CURVE_KEYS = ("step", "tokens", "seconds", "loss", "ce", "aux_loss", "lr", "grad_norm")


def cell_workdir(runs_dir: Path, experiment: str, scale: str, cell: str) -> Path:
    return Path(runs_dir) / experiment / scale / cell


def record_dir(results_dir: Path, experiment: str, scale: str, cell: str) -> Path:
    return Path(results_dir) / RECORDS / experiment / scale / cell


def finder(experiment: str, scale: str, runs_dir: Path, results_dir: Path | None, shared: bool = True):
    """find(run, cfg) -> the local workdir or else the committed record holding a finished or
    diverged run of cfg, else (shared) a finished identical run of another experiment, or None
    (results_dir None: local workdirs only)."""
    elsewhere = identical_finder(experiment, scale, runs_dir, results_dir) if shared else (lambda cfg: None)

    def find(run: str, cfg: Config) -> Path | None:
        dirs = [cell_workdir(runs_dir, experiment, scale, run)]
        if results_dir is not None:
            dirs.append(record_dir(results_dir, experiment, scale, run))
        return next((d for d in dirs if finished(d, cfg) or diverged(d, cfg)), None) or elsewhere(cfg)

    return find


def result_key(cfg: Config) -> str:
    """What decides a run's result: its config less the keys a resume may change (train.steps kept),
    as canonical JSON. Two runs with one key are the same run (config_matches)."""
    ignored = set(wd.RESUMABLE_KEYS) - {"train.steps"}
    flat = config_lib.flatten(config_lib.to_dict(cfg))
    return json.dumps({k: v for k, v in flat.items() if k not in ignored}, sort_keys=True, default=str)


def identical_finder(experiment: str, scale: str, runs_dir: Path, results_dir: Path | None):
    """find(cfg) -> a finished run of exactly cfg made for another experiment at this scale (its local
    workdir, else its committed record), or None. One experiment's cells may repeat another's (e.g.
    recall_vs_state's default-knob cells are mqar_capacity's narrowest): such a run is trained once.
    The index of the other experiments' finished runs is built at the first lookup."""
    index: dict[str, Path] | None = None

    def find(cfg: Config) -> Path | None:
        nonlocal index
        if index is None:
            index = {}
            roots = [Path(runs_dir)] + ([Path(results_dir) / RECORDS] if results_dir is not None else [])
            for run_dir in (d for root in roots for d in sorted(root.glob(f"*/{scale}/*"))):
                if run_dir.parts[-3] == experiment or not (run_dir / wd.EVAL).exists():
                    continue
                saved = read_json(run_dir / wd.CONFIG)
                try:
                    index.setdefault(result_key(config_lib.from_dict(saved["config"])), run_dir)
                except (ValueError, KeyError, TypeError):  # unreadable or from an incompatible version
                    continue
        found = index.get(result_key(cfg))
        return found if found is not None and finished(found, cfg) else None

    return find


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def config_matches(config_json: dict | None, cfg: Config) -> bool:
    """The run's config.json holds `cfg` (apart from the resumable keys that leave results unchanged:
    logging, checkpointing, mesh; train.steps must match)."""
    if not config_json or "config" not in config_json:
        return False
    try:
        saved = config_lib.from_dict(config_json["config"])
    except (ValueError, KeyError, TypeError):
        return False
    # Keys a resume may change that do not change a finished run's result; train.steps does.
    ignored = tuple(k + ":" for k in wd.RESUMABLE_KEYS if k != "train.steps")
    return not [d for d in config_lib.diff(saved, cfg) if not d.startswith(ignored)]


def _holds(run_dir: Path, marker: str, cfg: Config) -> bool:
    return (Path(run_dir) / marker).exists() and config_matches(read_json(Path(run_dir) / wd.CONFIG), cfg)


def finished(run_dir: Path, cfg: Config) -> bool:
    """A finished run of `cfg` lives in run_dir (a workdir or a record): eval.json and a matching config."""
    return _holds(run_dir, wd.EVAL, cfg)


def diverged(run_dir: Path, cfg: Config) -> bool:
    """A run of `cfg` in run_dir stopped on a non-finite value (sweep wrote wd.DIVERGED)."""
    return _holds(run_dir, wd.DIVERGED, cfg)


def downsample(rows: list[dict], max_train_rows: int = MAX_TRAIN_ROWS) -> list[dict]:
    """Rows for curves: every validation row ("eval/..." keys) and at most max_train_rows training
    rows evenly spaced (first and last kept), each with CURVE_KEYS and eval keys only. Idempotent."""
    slim = [{k: v for k, v in r.items() if k in CURVE_KEYS or k.startswith("eval/")} for r in rows]
    train = [i for i, r in enumerate(slim) if not any(k.startswith("eval/") for k in r)]
    keep = set(i for i, r in enumerate(slim) if i not in train)
    if len(train) > max_train_rows:
        train = [train[j] for j in np.unique(np.linspace(0, len(train) - 1, max_train_rows).round().astype(int))]
    keep.update(train)
    return [slim[i] for i in sorted(keep)]


def export(workdir: Path, dest: Path) -> None:
    """Copy a finished (or diverged) workdir's record (config.json, eval.json or diverged.json,
    down-sampled metrics) to dest."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in (wd.CONFIG, wd.EVAL, wd.DIVERGED):
        if not (workdir / name).exists():
            (dest / name).unlink(missing_ok=True)  # a record of an earlier config must not survive in part
            continue
        _write_if_changed(dest / name, (workdir / name).read_text())
    _write_if_changed(dest / wd.METRICS, "".join(json.dumps(r) + "\n" for r in downsample(wd.read_metrics(workdir))))


def _write_if_changed(path: Path, text: str) -> None:
    """Atomic write, skipped when the file already holds `text` (records stay untouched on a rerun)."""
    if not path.exists() or path.read_text() != text:
        wd.write_atomic(path, text)
