"""Mamba's selective scan as a C++ kernel called from inside XLA (an FFI custom call), on CPU.

    h_t = exp(dt_t A) * h_{t-1} + dt_t u_t B_t,   y_t = C_t . h_t

Why: XLA:CPU runs a token-by-token scan as a while loop whose every iteration is a few small
kernels, and the chunked form writes (batch, chunk, E, N) decays and states to memory; at the cpu
benchmark's shape (8 x 512 tokens, E 1024, N 16) its forward + backward took 0.56-0.59 s per layer
(0.11 s in this kernel), most of the Mamba model's step. The kernel keeps each block of 16 channels'
state in registers and L1, vectorizes over the channels, and recomputes states in the backward pass
from one kept every 64 tokens, so it needs no (L, E, N) memory at all (`selective_scan.cc`). It runs
on the CPUs the process may use, and its sums come out bitwise the same whatever their number.

`baselines.mamba.selective_scan_reference` (plain lax.scan) is its reference; the Mamba layer takes it
under `scan=auto` on the CPU backend with one device where `available()` is None.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

from cfm_jax.kernels.build import load

SOURCE = Path(__file__).with_name("selective_scan.cc")
FORWARD, BACKWARD = "cfm_selective_scan_forward", "cfm_selective_scan_backward"


@functools.cache
def available() -> str | None:
    """None if the kernel is built and registered, else why it cannot run (one line)."""
    if sys.platform != "linux" or jax.default_backend() != "cpu":
        return f"the selective-scan kernel is for the CPU backend on Linux (this is {jax.default_backend()} on {sys.platform})"
    lib = load(SOURCE, ("-O3", "-march=native", "-pthread"),
               {FORWARD: "CfmSelectiveScanForward", BACKWARD: "CfmSelectiveScanBackward"})
    return lib if isinstance(lib, str) else None


def _like(*arrays):
    return tuple(jax.ShapeDtypeStruct(a.shape, jnp.float32) for a in arrays)


def selective_scan_kernel(u, dt, A, B, C, h0):
    """u, dt: (b, L, E); A: (E, N); B, C: (b, L, N); h0: (b, E, N), all float32 -> (y: (b, L, E),
    final h: (b, E, N)); y without the D skip and gate, as `selective_scan_reference`. Differentiable
    (reverse mode) in every operand."""
    if why := available():
        raise RuntimeError(why)
    b, L, E = u.shape if u.ndim == 3 else (None,) * 3
    N = A.shape[-1]
    want = {"u": (b, L, E), "dt": (b, L, E), "A": (E, N), "B": (b, L, N), "C": (b, L, N), "h0": (b, E, N)}
    for name, x in zip(want, (u, dt, A, B, C, h0)):
        if x.shape != want[name] or x.dtype != jnp.float32:
            raise ValueError(f"selective_scan_kernel: {name} is {x.dtype}{list(x.shape)}, expected float32"
                             f"{list(want[name])} (u (b, L, E), A (E, N))")
    return _scan(u, dt, A, B, C, h0)


@jax.custom_vjp
def _scan(u, dt, A, B, C, h0):
    return jax.ffi.ffi_call(FORWARD, _like(u, h0), vmap_method="sequential")(u, dt, A, B, C, h0)


def _forward(u, dt, A, B, C, h0):
    return _scan(u, dt, A, B, C, h0), (u, dt, A, B, C, h0)


def _backward(inputs, cotangents):
    dy, dh = cotangents
    call = jax.ffi.ffi_call(BACKWARD, _like(*inputs), vmap_method="sequential")
    return tuple(call(*inputs, dy.astype(jnp.float32), dh.astype(jnp.float32)))


_scan.defvjp(_forward, _backward)
