"""What produced a run: code state, library versions, device and the kernels chosen.

Written into a workdir's config.json (at every `train` invocation) and eval.json (at `eval`), and read
back by `cfm-jax report`, which states the commit(s) and dates of a table's runs and warns when one
table mixes commits.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import subprocess
from pathlib import Path

import jax

REPO = Path(__file__).resolve().parents[1]
# Paths whose uncommitted changes (tracked or untracked) change what a run computes; results,
# README and tests do not.
CODE_PATHS = ("cfm_jax", "baselines", "experiments", "pyproject.toml", ":(exclude)experiments/results")
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy")


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def git_state() -> dict:
    """{"commit": sha or "unknown", "dirty": bool, "dirty_files": [...]}: dirty counts modified and
    untracked files under CODE_PATHS."""
    sha = _git("rev-parse", "HEAD")
    if sha is None:
        return {"commit": "unknown", "dirty": False, "dirty_files": []}
    status = _git("status", "--porcelain", "--untracked-files=all", "--", *CODE_PATHS) or ""
    files = sorted(line[3:] for line in status.splitlines() if line.strip())
    return {"commit": sha.strip(), "dirty": bool(files), "dirty_files": files[:20]}


def versions() -> dict:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def kernels(cfg=None) -> dict:
    """The matmul mode and which CPU kernels can run here (None = runs; else why not), and for a
    config, the scan its gated mixers resolve to."""
    from cfm_jax.kernels import cblas, flash_attention, selective_scan

    out = {
        "CFM_JAX_MATMUL": os.environ.get(cblas.ENV, "auto"),
        "mkl": _why_not(cblas._load),
        "mkl_under_auto": _mkl_verdict(),  # whether CFM_JAX_MATMUL=auto took MKL here, and the rates measured
        "flash_attention": _why_not(flash_attention.available),
        "selective_scan": _why_not(selective_scan.available),
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
        "CFM_JAX_PLUGINS": os.environ.get("CFM_JAX_PLUGINS", ""),  # kinds from outside the repository
    }
    if cfg is not None:
        out["mixer_scans"] = _mixer_scans(cfg)
    return out


def _mkl_verdict() -> str:
    from cfm_jax.kernels import cblas, mkl_calibration

    try:
        if why_not := cblas.mkl_unavailable():
            return f"MKL cannot run: {why_not}"
        pays, why = mkl_calibration.mkl_pays()
    except Exception as e:  # noqa: BLE001 - a provenance probe must never stop a run
        return f"{type(e).__name__}: {e}"
    return f"{'used' if pays else 'not used'}: {why}"


def _why_not(check) -> str:
    try:
        why = check()
    except Exception as e:  # noqa: BLE001 - a provenance probe must never stop a run
        why = f"{type(e).__name__}: {e}"
    return "available" if why is None else str(why)


def _mixer_scans(cfg) -> dict:
    """kind -> resolved scan for each gated mixer kind the model uses (attention picks its kernel
    per call from the shapes: `flash_attention` above says whether `auto` can take the kernel)."""
    kinds = {cfg.model.mixer.kind: cfg.model.mixer, **{m.kind: m for m in cfg.model.mixers}}
    out = {}
    for kind, mixer in kinds.items():
        scan = getattr(mixer, "scan", None)
        if scan is None:
            continue
        try:
            if kind == "mamba":
                from baselines.mamba import pick_scan
                out[kind] = pick_scan(scan)
            else:
                out[kind] = scan if scan != "auto" else "auto (sequential for small head states on CPU, else matmul)"
        except Exception as e:  # noqa: BLE001
            out[kind] = f"{type(e).__name__}: {e}"
    return out


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def provenance(cfg=None) -> dict:
    """Everything above in one JSON-able dict, with the UTC time it was taken."""
    return {
        "time": now(), "git": git_state(), "versions": versions(),
        "backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
        "device_count": jax.device_count(), "kernels": kernels(cfg),
    }


def commit_label(prov: dict) -> str:
    """'abc1234' or 'abc1234+dirty' (short sha) from a provenance dict."""
    git = prov.get("git", {})
    sha = git.get("commit", "unknown")
    return (sha[:7] if sha != "unknown" else sha) + ("+dirty" if git.get("dirty") else "")
