"""float32 matmuls (2-D, or with one batch axis) through MKL's sgemm, called from inside XLA (an FFI
custom call), on CPU.

Why: on the 2-core CPUs this project was first tuned on, XLA:CPU's own GEMM reached 240-300 GFLOP/s
at the training step's shapes (4096 x 512 x 2736 and the like) where MKL, PyTorch's GEMM, reached
350-360 (`experiments/results/bench.md`). That depends on the CPU, so `auto` measures it (below).
The model's projections call `matmul`, which runs MKL's sgemm in the compiled step, and its
reference, plain `a @ b` in XLA, everywhere else.

Which one runs is chosen when a function is traced, by CFM_JAX_MATMUL:
  auto (default)  MKL where it can run: CPU backend, one device, float32, and the MKL runtime
                  (`pip install mkl`, in the dev and bench extras) plus a C++ compiler to build the
                  short handler once (cached under ~/.cache/cfm_jax), and only where MKL was
                  measured faster than XLA's dot on this CPU (`mkl_calibration`: on an AMD Zen 5
                  XLA's AVX-512 dot is ~2x MKL's AVX2 sgemm); XLA otherwise.
  xla             always XLA.
  mkl             MKL, or a one-line error saying why it cannot run.
The handler is built and registered on first use; `backend()` says what `auto` resolved to and why.
A function jitted once keeps the backend it was traced with (jax's cache does not see the variable):
set it before the first call, or use `forced` around a fresh trace.

MKL runs in its conditional-numerical-reproducibility mode (MKL_CBWR=AUTO,STRICT unless set), so a
product is bitwise the same from run to run, as resumed runs need. `matmul` has a custom VJP and
`product` none: forward-mode autodiff (jax.jvp, jacfwd) through them needs CFM_JAX_MATMUL=xla,
which also turns the model's other hand-written VJPs (flash attention, RMSNorm, SwiGLU) into plain autodiff.

`grouped_matmul` (the MoE's experts) multiplies consecutive groups of rows by their own matrices,
one sgemm per group with the group sizes read at run time: what `jax.lax.ragged_dot` computes, which
XLA:CPU runs as masked dense (every row times every group's matrix).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import glob
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from cfm_jax import policy
from cfm_jax.errors import UserError
from cfm_jax.kernels import mkl_calibration
from cfm_jax.kernels.build import load

ENV = "CFM_JAX_MATMUL"
# Smaller products (batch-1 decode, smoke-scale models) stay in XLA under auto: there MKL's call and
# thread wake-up cost more than the work (decode latency +10-20 % at one row; a smoke-scale training
# run +10 %). Every product of the cpu-scale benchmark models is far above it (>= 134 MFLOP).
MIN_FLOPS = 2**25
MODES = ("auto", "xla", "mkl")
TARGET = "cfm_cblas_gemm"
GROUPED_TARGET = "cfm_cblas_grouped_gemm"
SOURCE = Path(__file__).with_name("cblas_gemm.cc")


@contextlib.contextmanager
def forced(value: str):
    """Within the block, functions traced use this mode (auto, xla or mkl) whatever the environment."""
    old = os.environ.get(ENV)
    os.environ[ENV] = value
    try:
        mode()  # validates
        yield
    finally:
        if old is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = old


def mode() -> str:
    value = os.environ.get(ENV, "auto")
    if value not in MODES:
        raise UserError(f"{ENV}={value!r} is not a matmul backend; allowed: {', '.join(MODES)}")
    return value


def _mkl_runtime() -> str | None:
    """Path of MKL's single dynamic library as the `mkl` wheel installs it (<prefix>/lib)."""
    for prefix in dict.fromkeys((sys.prefix, sys.base_prefix)):
        found = sorted(glob.glob(os.path.join(prefix, "lib", "libmkl_rt.so*")))
        if found:
            return found[0]
    return None


@functools.cache
def mkl_library() -> ctypes.CDLL | str:
    """MKL's runtime library, loaded in LP64 mode with its environment set (below); or why it cannot
    be (one line)."""
    if sys.platform != "linux":
        return f"the MKL handlers are built for Linux only (this is {sys.platform})"
    runtime = _mkl_runtime()
    if runtime is None:
        return "the MKL runtime is not installed (pip install mkl)"
    # MKL's OpenMP threads sleep at once after a call instead of spinning for 200 ms: spinning, they
    # would take the cores from XLA's own threads running the elementwise work between matmuls.
    os.environ.setdefault("KMP_BLOCKTIME", "0")
    os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")  # bitwise reproducible (see the module docstring)
    try:
        mkl = ctypes.CDLL(runtime)
    except OSError as e:
        return str(e).splitlines()[0]
    mkl.MKL_Set_Interface_Layer(0)  # LP64: the handlers pass 32-bit ints, whatever MKL_INTERFACE_LAYER says
    return mkl


@functools.cache
def _load() -> str | None:
    """Build and register the handler; None if it worked, else the reason it cannot run."""
    mkl = mkl_library()
    if isinstance(mkl, str):
        return mkl
    handler = load(SOURCE, ("-O2",), {TARGET: "CfmGemm", GROUPED_TARGET: "CfmGroupedGemm"})
    if isinstance(handler, str):
        return handler
    gemms = (mkl.cblas_sgemm, mkl.cblas_sgemm_batch_strided)
    handler.cfm_set_sgemm(*(ctypes.cast(fn, ctypes.c_void_p) for fn in gemms))  # before any call runs
    return None


def mkl_unavailable(*arrays: jax.Array) -> str | None:
    """Why MKL cannot multiply these operands here (one line), or None where it can: CPU backend, one
    device, float32, MKL runtime and handler built. Says nothing about whether it pays (`backend`)."""
    reasons = []
    if not policy.on_cpu():
        reasons.append(f"backend is {policy.backend()}, not cpu")
    elif not policy.cpu_kernels():  # XLA cannot partition a custom call; sharded steps keep its dot
        reasons.append(f"{jax.device_count()} devices (MKL path is single-device)")
    if any(a.dtype != jnp.float32 for a in arrays):
        reasons.append(f"dtype {', '.join(sorted({str(a.dtype) for a in arrays}))} (MKL path is float32)")
    if not reasons and (why := _load()):
        reasons.append(why)
    return "; ".join(reasons) or None


def backend(*arrays: jax.Array, flops: int | None = None) -> tuple[str, str]:
    """("mkl" or "xla", why) for a matmul of these operands, of `flops` FLOPs, traced now. auto: MKL
    where it can run, the product is large enough and MKL was measured faster on this CPU
    (`mkl_calibration`)."""
    wanted = mode()
    if wanted == "xla":
        return "xla", f"{ENV}=xla"
    if wanted == "auto" and flops is not None and flops < MIN_FLOPS:
        return "xla", f"{flops} FLOPs (< {MIN_FLOPS}: faster in XLA)"
    if why := mkl_unavailable(*arrays):
        if wanted == "mkl":
            raise UserError(f"{ENV}=mkl cannot run: {why} (use auto or xla)")
        return "xla", why
    if wanted == "auto":
        pays, why = mkl_calibration.mkl_pays()
        if not pays:
            return "xla", why
    return "mkl", "MKL sgemm through an XLA FFI call"


def _columns(a: jax.Array, b: jax.Array, trans_a: bool, trans_b: bool, message: str) -> int:
    """n, the columns of op(a) @ op(b), after checking the operands fit (2-D or one shared batch axis,
    equal contracted sizes); ValueError with `message` otherwise. The product's FLOPs are then
    2 * a.size * n (batch * m * k multiply-adds per output column)."""
    k_a = a.shape[-2] if trans_a else a.shape[-1]
    k_b = b.shape[-1] if trans_b else b.shape[-2]
    if a.ndim not in (2, 3) or b.ndim != a.ndim or k_a != k_b or a.shape[:-2] != b.shape[:-2]:
        raise ValueError(f"{message} (one optional batch axis; trans_a={trans_a}, trans_b={trans_b})")
    return b.shape[-2] if trans_b else b.shape[-1]


def _gemm(a: jax.Array, b: jax.Array, trans_a: bool, trans_b: bool) -> jax.Array:
    """op(a) @ op(b) in MKL, per leading batch index if 3-D: a (.., m, k) or (.., k, m) if trans_a,
    b (.., k, n) or (.., n, k) if trans_b -> (.., m, n)."""
    m = a.shape[-1] if trans_a else a.shape[-2]
    n = b.shape[-2] if trans_b else b.shape[-1]
    out = jax.ShapeDtypeStruct((*a.shape[:-2], m, n), jnp.float32)
    call = jax.ffi.ffi_call(TARGET, out, vmap_method="sequential")
    return call(a, b, trans_a=np.bool_(trans_a), trans_b=np.bool_(trans_b))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _mkl_matmul(a: jax.Array, b: jax.Array, transpose_b: bool) -> jax.Array:
    return _gemm(a, b, False, transpose_b)


def _fwd(a, b, transpose_b):
    return _gemm(a, b, False, transpose_b), (a, b)


def _bwd(transpose_b, res, g):
    a, b = res  # transposes are BLAS flags, never copies
    if transpose_b:  # c = a b^T: da = g b, db = g^T a
        return _gemm(g, b, False, False), _gemm(g, a, True, False)
    return _gemm(g, b, False, True), _gemm(a, g, True, False)  # c = a b: da = g b^T, db = a^T g


_mkl_matmul.defvjp(_fwd, _bwd)


def matmul(a: jax.Array, b: jax.Array, transpose_b: bool = False, preferred_element_type=None) -> jax.Array:
    """a (m, k) @ b (k, n) -> (m, n), or batched: a (batch, m, k) @ b (batch, k, n) -> (batch, m, n);
    with transpose_b, b is (.., n, k) and a @ b^T is taken. In MKL or XLA as `backend` decides (same
    result up to rounding); `preferred_element_type` is XLA's (MKL computes float32 in float32)."""
    n = _columns(a, b, False, transpose_b, f"matmul takes (.., m, k) @ (.., k, n), got {a.shape} @ {b.shape}")
    float32_out = preferred_element_type is None or np.dtype(preferred_element_type) == np.float32
    if float32_out and backend(a, b, flops=2 * a.size * n)[0] == "mkl":
        return _mkl_matmul(a, b, transpose_b)
    return jnp.einsum("...mk,...nk->...mn" if transpose_b else "...mk,...kn->...mn", a, b,
                      preferred_element_type=preferred_element_type)


def product(a: jax.Array, b: jax.Array, trans_a: bool = False, trans_b: bool = False) -> jax.Array:
    """op(a) @ op(b) for hand-written backward passes (no gradient of its own: differentiate `matmul`
    instead): a (.., m, k), or (.., k, m) with trans_a; b (.., k, n), or (.., n, k) with trans_b;
    2-D or one batch axis. MKL or XLA as `backend` decides."""
    n = _columns(a, b, trans_a, trans_b,
                 f"product takes op(a) (.., m, k) and op(b) (.., k, n), got {a.shape} and {b.shape}")
    if backend(a, b, flops=2 * a.size * n)[0] == "mkl":
        return _gemm(a, b, trans_a, trans_b)
    return (jnp.swapaxes(a, -1, -2) if trans_a else a) @ (jnp.swapaxes(b, -1, -2) if trans_b else b)


def grouped_matmul_reference(a: jax.Array, b: jax.Array, group_sizes: jax.Array, transpose_b: bool = False) -> jax.Array:
    """Obviously right `grouped_matmul`: every row times its group's gathered matrix (copies one
    (k, n) matrix per row). a (M, k), b (G, k, n) or (G, n, k), group_sizes (G,) -> (M, n)."""
    group = jnp.searchsorted(jnp.cumsum(group_sizes), jnp.arange(a.shape[0]), side="right")  # (M,)
    mats = b[jnp.minimum(group, b.shape[0] - 1)]
    out = jnp.einsum("mk,mnk->mn" if transpose_b else "mk,mkn->mn", a, mats)
    return jnp.where((group < b.shape[0])[:, None], out, 0.0)


def _grouped(a, b, sizes, trans_b: bool, contract: bool) -> jax.Array:
    """The grouped handler: contract=False -> (M, n) rows times their group's op(b[g]); contract=True
    -> (G, k, n), group g's rows of a^T @ b (see cblas_gemm.cc)."""
    if contract:
        shape = (sizes.shape[0], a.shape[1], b.shape[1])
    else:
        shape = (a.shape[0], b.shape[1] if trans_b else b.shape[2])
    call = jax.ffi.ffi_call(GROUPED_TARGET, jax.ShapeDtypeStruct(shape, jnp.float32), vmap_method="sequential")
    return call(a, b, sizes.astype(jnp.int32), trans_b=np.bool_(trans_b), contract=np.bool_(contract))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _mkl_grouped(a: jax.Array, b: jax.Array, sizes: jax.Array, transpose_b: bool) -> jax.Array:
    return _grouped(a, b, sizes, transpose_b, False)


def _grouped_fwd(a, b, sizes, transpose_b):
    return _grouped(a, b, sizes, transpose_b, False), (a, b, sizes)


def _grouped_bwd(transpose_b, res, g):
    a, b, sizes = res
    if transpose_b:  # c_g = a_g b_g^T: da_g = g_g b_g, db_g = g_g^T a_g
        return _grouped(g, b, sizes, False, False), _grouped(g, a, sizes, False, True), None
    return _grouped(g, b, sizes, True, False), _grouped(a, g, sizes, False, True), None  # db_g = a_g^T g_g


_mkl_grouped.defvjp(_grouped_fwd, _grouped_bwd)


def grouped_matmul(a: jax.Array, b: jax.Array, group_sizes: jax.Array, transpose_b: bool = False) -> jax.Array:
    """Rows of a in consecutive groups, each times its own matrix (`jax.lax.ragged_dot`): a (M, k),
    b (G, k, n), or (G, n, k) with transpose_b, group_sizes (G,) int >= 0, summing to at most M ->
    (M, n), rows past the last group zero. Differentiable in a and b.

    In MKL one sgemm per group, the sizes read at run time, so no group is padded; under XLA,
    `ragged_dot`, which XLA:CPU runs as masked dense (G times the work): callers that can block
    their rows instead should check `backend` first (the MoE's dropless dispatch does)."""
    m, k = a.shape
    if b.ndim != 3 or b.shape[2 if transpose_b else 1] != k or group_sizes.shape != (b.shape[0],):
        raise ValueError(f"grouped_matmul takes a (M, k), b (G, {'n, k' if transpose_b else 'k, n'}) and "
                         f"group_sizes (G,), got {a.shape}, {b.shape} and {group_sizes.shape}")
    n = b.shape[1] if transpose_b else b.shape[2]
    if backend(a, b, flops=2 * a.size * n)[0] == "mkl":
        return _mkl_grouped(a, b, group_sizes, transpose_b)
    return jax.lax.ragged_dot(a, jnp.swapaxes(b, 1, 2) if transpose_b else b, group_sizes.astype(jnp.int32))
