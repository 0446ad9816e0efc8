"""A batch-1 FATReLU FFN over a given set of neurons, reading their weight rows in place: a C++
kernel called from inside XLA (an FFI custom call), on CPU, for `cfm-jax bench`'s sparse-decode
ceiling.

Why: the perfect-predictor columns of the benchmark gather the active neurons' rows (XLA's take,
PyTorch's index_select), which writes a copy of them before the product reads it. This kernel streams
each active row once (`active_rows.cc`), so its time is the ceiling of a predictor-driven gather path
without that copy. `cfm_jax.bench.active_rows_ffn` (plain JAX) is its reference.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from cfm_jax.kernels.build import load

SOURCE = Path(__file__).with_name("active_rows.cc")
TARGET = "cfm_active_rows"


@functools.cache
def available() -> str | None:
    """None if the kernel is built and registered, else why it cannot run (one line)."""
    if jax.default_backend() != "cpu":
        return f"the active-rows kernel is for the CPU backend (this is {jax.default_backend()})"
    lib = load(SOURCE, ("-O3", "-march=native", "-pthread"), {TARGET: "CfmActiveRows"})
    return lib if isinstance(lib, str) else None


def active_rows_ffn_in_place(x: jax.Array, up_rows: jax.Array, down: jax.Array, active: jax.Array,
                             threshold: float) -> jax.Array:
    """x (d,), up_rows (f, d) (W_up transposed), down (f, d), active (K,) neuron indices (out-of-range
    ones, negative ones included, ignored) -> (d,): sum over the active neurons of fatrelu(up_rows[i] . x) down[i]. float32, no
    gradient (an inference kernel)."""
    if why := available():
        raise RuntimeError(why)
    if x.ndim != 1 or up_rows.shape != down.shape or up_rows.ndim != 2 or up_rows.shape[1] != x.shape[0]:
        raise ValueError(f"active_rows_ffn_in_place takes x (d,), up_rows and down (f, d), got {x.shape}, "
                         f"{up_rows.shape}, {down.shape}")
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(x.shape, jnp.float32), vmap_method="sequential")
    return call(x.astype(jnp.float32), up_rows.astype(jnp.float32), down.astype(jnp.float32),
                active.astype(jnp.int32), threshold=np.float32(threshold))
