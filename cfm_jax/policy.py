"""Where the backend-specific choices are made: the research modules ask these questions instead of
testing `jax.default_backend()` themselves, so what changes between a CPU and an accelerator is read
in one place (and can be faked in one place in tests).

The CPU machinery (MKL matmuls, the C++ kernels, token-by-token scans for small recurrent states)
is used only where `cpu_kernels()` holds: the CPU backend with one device, where it was measured to
pay (docs/PERFORMANCE.md). Everywhere else the plain JAX paths run (what an accelerator wants).
"""

from __future__ import annotations

import jax


def backend() -> str:
    """"cpu", "gpu" or "tpu"."""
    return jax.default_backend()


def on_cpu() -> bool:
    return backend() == "cpu"


def cpu_kernels() -> bool:
    """Whether the single-device CPU machinery may run here (each kernel still checks that it builds)."""
    return on_cpu() and jax.device_count() == 1


def token_loop_pays(small_state: bool, backend_name: str | None = None) -> bool:
    """A token-by-token recurrence beats the chunked matmul form only on a CPU and only for small
    per-head states (measured for GLA / RWKV); on accelerators a token loop is launch-bound."""
    return small_state and (backend_name or backend()) == "cpu"


def hand_written_vjps() -> bool:
    """The hand-written RMSNorm / SwiGLU backward passes (written for XLA:CPU's fusions): only on the
    CPU and not under CFM_JAX_MATMUL=xla; elsewhere plain autodiff (forward mode works too)."""
    from cfm_jax.kernels import cblas

    return on_cpu() and cblas.mode() != "xla"


def attention_implementation(dtype) -> str | None:
    """`jax.nn.dot_product_attention`'s implementation off the CPU: cuDNN's fused attention on a GPU
    for 16-bit inputs (what it supports), else None (XLA's)."""
    import jax.numpy as jnp

    return "cudnn" if backend() == "gpu" and dtype in (jnp.bfloat16, jnp.float16) else None
