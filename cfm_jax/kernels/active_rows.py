"""A batch-1 FATReLU FFN over a set of its neurons, reading their weight rows in place: C++ kernels
called from inside XLA (FFI custom calls), on CPU, for batch-1 sparse decoding (`cfm-jax bench`'s
sparse_decode suite). The set is either given (`active_rows_ffn_in_place`: the perfect-predictor
ceiling) or predicted from x by a low-rank predictor inside the kernel (`predicted_rows_ffn_in_place`,
`cfm_jax.layers.active_predictor`).

Why: the perfect-predictor columns of the benchmark gather the active neurons' rows (XLA's take,
PyTorch's index_select), which writes a copy of them before the product reads it. This kernel streams
each active row once (`active_rows.cc`), so its time is the ceiling of a predictor-driven gather path
without that copy. References in plain JAX: `cfm_jax.bench.active_rows_ffn` and
`active_predictor.predicted_ffn_reference`.
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
PREDICTED_TARGET = "cfm_predicted_rows"


@functools.cache
def available() -> str | None:
    """None if the kernel is built and registered, else why it cannot run (one line)."""
    if jax.default_backend() != "cpu":
        return f"the active-rows kernel is for the CPU backend (this is {jax.default_backend()})"
    lib = load(SOURCE, ("-O3", "-march=native", "-pthread"), {TARGET: "CfmActiveRows", PREDICTED_TARGET: "CfmPredictedRows"})
    return lib if isinstance(lib, str) else None


def active_rows_ffn_in_place(x: jax.Array, up_rows: jax.Array, down: jax.Array, active: jax.Array,
                             threshold: float) -> jax.Array:
    """x (d,), up_rows (f, d) (W_up transposed), down (f, d), active (K,) neuron indices (out-of-range
    ones, negative ones included, ignored) -> (d,): sum over the active neurons of fatrelu(up_rows[i] . x) down[i]. float32, no
    gradient (an inference kernel)."""
    _check(x, up_rows, down)
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(x.shape, jnp.float32), vmap_method="sequential")
    return call(x.astype(jnp.float32), up_rows.astype(jnp.float32), down.astype(jnp.float32),
                active.astype(jnp.int32), threshold=np.float32(threshold))


def predicted_rows_ffn_in_place(x: jax.Array, pred, up_rows: jax.Array, down: jax.Array, threshold: float) -> jax.Array:
    """x (d,), pred a `LowRankPredictor` (proj_rows (r, d), lift (r, f), cut (f,)), up_rows and
    down (f, d) -> (d,): sum over the predicted neurons i (those with ((proj_rows @ x) @ lift)[i] >
    cut[i]) of fatrelu(up_rows[i] . x) down[i]. float32, no gradient."""
    _check(x, up_rows, down)
    r, f = pred.proj_rows.shape[0], up_rows.shape[0]
    if pred.proj_rows.shape != (r, x.shape[0]) or pred.lift.shape != (r, f) or pred.cut.shape != (f,):
        raise ValueError(f"predictor shapes {pred.proj_rows.shape}, {pred.lift.shape}, {pred.cut.shape} do not fit "
                         f"d={x.shape[0]}, f={f}: expected (r, d), (r, f), (f,)")
    call = jax.ffi.ffi_call(PREDICTED_TARGET, jax.ShapeDtypeStruct(x.shape, jnp.float32), vmap_method="sequential")
    as32 = lambda a: jnp.asarray(a, jnp.float32)
    return call(as32(x), as32(pred.proj_rows), as32(pred.lift), as32(pred.cut), as32(up_rows), as32(down),
                threshold=np.float32(threshold))


def _check(x, up_rows, down) -> None:
    if why := available():
        raise RuntimeError(why)
    if x.ndim != 1 or up_rows.shape != down.shape or up_rows.ndim != 2 or up_rows.shape[1] != x.shape[0]:
        raise ValueError(f"active_rows_ffn_in_place takes x (d,), up_rows and down (f, d), got {x.shape}, "
                         f"{up_rows.shape}, {down.shape}")
