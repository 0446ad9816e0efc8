"""The workdir is the run: config.json, metrics.jsonl, checkpoints/, eval.json. Writes are atomic."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
import tempfile
from pathlib import Path

import jax

from cfm_jax import config as config_lib
from cfm_jax import provenance
from cfm_jax.config import Config
from cfm_jax.errors import UserError

CONFIG, METRICS, EVAL, CHECKPOINTS = "config.json", "metrics.jsonl", "eval.json", "checkpoints"
DIVERGED = "diverged.json"  # written by `cfm-jax sweep` when a cell's training stopped on a non-finite value
LOCK = ".lock"  # held by the process training in the workdir (see locked)
# Fields that may change between invocations on one workdir without changing what is trained so far.
RESUMABLE_KEYS = (
    "train.steps", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
    "train.mesh", "train.fsdp", "train.skip_nonfinite", "train.eval_every",
    "train.max_consecutive_skips", "train.tensorboard", "train.wandb",
)


@contextlib.contextmanager
def locked(workdir: Path):
    """Hold an exclusive lock on workdir/.lock (fcntl) while one process trains in it; a second
    writer gets a one-line UserError instead of interleaving its steps with the first's. The kernel
    drops the lock when the process dies, so a killed run never leaves a stale lock behind."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    f = open(workdir / LOCK, "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise UserError(f"workdir {str(workdir)!r} is in use by another process (a `cfm-jax train` on it is "
                        "still running); wait for it to finish or use another --workdir") from None
    try:
        yield
    finally:
        f.close()  # closing the file releases the lock


def write_atomic(path: Path, text: str) -> None:
    """Write via a temp file + rename, so readers never see a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; results are shared files like any other
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: Path, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def load_config(workdir: Path) -> Config:
    path = Path(workdir) / CONFIG
    if not path.exists():
        raise UserError(f"{str(workdir)!r} is not a workdir: it has no {CONFIG} (train it first)")
    try:
        return config_lib.from_dict(json.loads(path.read_text())["config"]).validate()
    except (ValueError, KeyError, TypeError) as e:
        if isinstance(e, UserError):
            raise
        raise UserError(f"{path} is not a valid cfm_jax config: {e}") from None


def check_compatible(workdir: Path, cfg: Config) -> None:
    """Refuse to resume a workdir whose saved config differs in anything but RESUMABLE_KEYS."""
    if not (Path(workdir) / CONFIG).exists():
        ckpts = Path(workdir) / CHECKPOINTS
        if ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir()):
            raise UserError(f"workdir {str(workdir)!r} holds checkpoints but no {CONFIG}, so which config they belong "
                            "to is unknown; restore its config.json or use another --workdir")
        return
    saved = load_config(workdir)
    changes = [d for d in config_lib.diff(saved, cfg) if not d.startswith(tuple(k + ":" for k in RESUMABLE_KEYS))]
    if changes:
        raise UserError(
            f"workdir {str(workdir)!r} holds a different config ({'; '.join(changes[:3])}"
            f"{'; ...' if len(changes) > 3 else ''}); use another --workdir, or --reconfigure to continue under the new config"
        )


def save_config(workdir: Path, cfg: Config) -> None:
    """config.json: the resolved config and the provenance of this invocation (cfm_jax.provenance)."""
    prov = provenance.provenance(cfg)
    write_json(
        Path(workdir) / CONFIG,
        {
            "config": config_lib.to_dict(cfg), "git_commit": provenance.commit_label(prov),
            "jax_version": jax.__version__, "device": f"{prov['backend']}: {prov['device']}", "provenance": prov,
        },
    )


def read_metrics(workdir: Path) -> list[dict]:
    """metrics.jsonl's rows. A line that does not parse (cut by a crash mid-write) is skipped with one
    warning line on stderr; the rows after it are kept."""
    path = Path(workdir) / METRICS
    if not path.exists():
        return []
    rows, torn = [], []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            torn.append(number)
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            torn.append(number)
    if torn:
        print(f"warning: {path}: skipped {len(torn)} unreadable line(s) (first: line {torn[0]})", file=sys.stderr)
    return rows


def truncate_metrics(workdir: Path, last_step: int) -> list[dict]:
    """Keep only rows with step <= last_step (rows past the restored checkpoint are redone)."""
    rows = [r for r in read_metrics(workdir) if r.get("step", 0) <= last_step]
    path = Path(workdir) / METRICS
    if path.exists():
        write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))
    return rows


def append_metrics(workdir: Path, row: dict) -> None:
    with open(Path(workdir) / METRICS, "a") as f:
        f.write(json.dumps(row) + "\n")
