"""Does MKL's sgemm beat XLA's own dot on this CPU? Measured once per CPU and software versions.

Why measured, not assumed: on the CPUs the MKL path was written for, MKL reached 325-360 GFLOP/s
where XLA:CPU's dot reached 240-300 (experiments/results/bench.md). On an AMD Zen 5 EPYC (full-width
AVX-512 units) MKL keeps to its AVX2 kernels: 185-207 GFLOP/s against XLA's 280-440 at the training
step's shapes, and a cpu-scale MQAR training step ran 1.14-1.44x slower with MKL (measured
2026-12-07). So `CFM_JAX_MATMUL=auto` takes MKL only where this measurement found it faster.

The measurement times both on the shapes below in a subprocess (a function being traced cannot run
anything), a few seconds, and is cached in the user cache (~/.cache/cfm_jax, or $XDG_CACHE_HOME)
under a key of the CPU model and flags, the cores this process may use, and the jax, jaxlib and MKL
versions. CFM_JAX_MKL_PAYS=1 or 0 skips it (a machine whose measurement should not be trusted, or
tests).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from cfm_jax.errors import UserError

ENV = "CFM_JAX_MKL_PAYS"
SHAPES = ((4096, 256, 688), (4096, 512, 1368), (4096, 1024, 1024))  # (m, k, n): cpu-scale projections and FFNs
MARGIN = 1.05  # MKL must be this much faster: a tie goes to XLA (no custom call, plain autodiff)
REPS = 5


def _key() -> str:
    import jax
    import jaxlib.version

    from cfm_jax.kernels import build, cblas

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    runtime = cblas._mkl_runtime() or ""
    text = f"{build._cpu()} {cores} {jax.__version__} {jaxlib.version.__version__} {os.path.realpath(runtime)}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_path() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cfm_jax" / f"mkl-pays-{_key()}.json"


def measure() -> dict:
    """Median seconds of MKL's sgemm and XLA's dot on each of SHAPES, summed: {"mkl_s", "xla_s",
    "flops", "shapes", "time"}. Runs the MKL handler directly (not through `cblas.backend`)."""
    import jax
    import jax.numpy as jnp

    from cfm_jax.bench.timing import timed
    from cfm_jax.kernels import cblas

    if (why := cblas._load()) is not None:
        raise RuntimeError(f"MKL cannot run: {why}")
    mkl = jax.jit(lambda a, b: cblas._gemm(a, b, False, False))
    xla = jax.jit(lambda a, b: a @ b)
    mkl_s = xla_s = flops = 0.0
    for m, k, n in SHAPES:
        a = jax.random.normal(jax.random.key(0), (m, k), jnp.float32)
        b = jax.random.normal(jax.random.key(1), (k, n), jnp.float32)
        mkl_s += timed(mkl, a, b, reps=REPS)
        xla_s += timed(xla, a, b, reps=REPS)
        flops += 2 * m * k * n
    return {"mkl_s": mkl_s, "xla_s": xla_s, "flops": flops, "shapes": SHAPES,
            "time": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def verdict(result: dict) -> tuple[bool, str]:
    """(MKL pays, one line with both rates) from a measurement."""
    pays = result["mkl_s"] * MARGIN <= result["xla_s"]
    rate = lambda s: result["flops"] / s / 1e9
    return pays, (f"MKL sgemm {rate(result['mkl_s']):.0f} vs XLA dot {rate(result['xla_s']):.0f} GFLOP/s on this CPU "
                  f"(measured {result['time']}): {'MKL' if pays else 'XLA'} is faster")


def mkl_pays() -> tuple[bool, str]:
    """(whether `auto` should run float32 matmuls in MKL here, why): CFM_JAX_MKL_PAYS, else the cached
    measurement, else a fresh one (cached). A measurement that fails says so and keeps XLA."""
    forced = os.environ.get(ENV)
    if forced is None:
        return measured()
    if forced not in ("0", "1"):
        raise UserError(f"{ENV}={forced!r} is not allowed; use 1 (MKL pays), 0 (it does not) or leave it unset (measure)")
    return forced == "1", f"{ENV}={forced}"


@functools.cache
def measured() -> tuple[bool, str]:
    """`mkl_pays` from the measurement: read from the cache file, or measured now and cached."""
    path = cache_path()
    try:
        return verdict(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError):
        pass
    env = {**os.environ, ENV: "0"}  # the subprocess never measures again
    done = subprocess.run([sys.executable, "-m", __name__], capture_output=True, text=True, env=env, timeout=600)
    try:
        result = json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return False, f"measuring MKL against XLA failed ({(done.stderr.strip() or 'no output').splitlines()[-1]}): XLA kept"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, path)  # concurrent measurements: the last one wins, whole
    return verdict(result)


if __name__ == "__main__":
    print(json.dumps(measure()))
