"""The C++ flash-attention kernel (cfm_jax/kernels/flash_attention.py) == the plain reference: outputs
and gradients over its tile boundaries, GQA and MQA, narrower values, large logits; bits independent
of the CPU count; bad operands refused; `pick_kernel`; the Attention layer under each kernel."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cfm_jax.errors import UserError
from cfm_jax.kernels import cblas, mkl_calibration
from cfm_jax.kernels import flash_attention as flash
from cfm_jax.layers.attention import Attention, AttentionConfig, attention_reference, pick_kernel
from cfm_jax.registry import LayerContext


@pytest.fixture(autouse=True)
def kernel_builds():
    if why := flash.available():
        pytest.skip(why)


def operands(batch, seq, heads, kv_heads, d, dv, seed, logit_scale=1.0):
    ks = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(ks[0], (batch, seq, heads, d)) * logit_scale
    k = jax.random.normal(ks[1], (batch, seq, kv_heads, d))
    v = jax.random.normal(ks[2], (batch, seq, kv_heads, dv))
    return q, k, v


def scaled_reference(scale):
    """attention_reference with its own 1/sqrt(d) replaced by `scale` (q rescaled to match)."""
    return lambda q, k, v: attention_reference(q * (scale * q.shape[-1] ** 0.5), k, v)


# Forward tiles: 128 queries x 128 keys; backward: 64 keys x up to 512 queries. Lengths below, at and
# past those (1, 63, 65, 129, 600), heads sharing a kv head (GQA, MQA) and value widths unlike d.
CASES = [
    (2, 1, 2, 1, 8, 8, None),
    (1, 63, 4, 4, 8, 8, None),
    (3, 65, 3, 3, 5, 7, None),
    (2, 129, 4, 2, 16, 8, 0.3),
    (1, 600, 2, 1, 8, 12, None),
]


@pytest.mark.parametrize("batch,seq,heads,kv_heads,d,dv,scale", CASES)
def test_kernel_matches_reference(batch, seq, heads, kv_heads, d, dv, scale):
    """Outputs and the gradients of sum(sin(out)) in q, k and v. Logits of order 10-30 make each
    row's running max change from one key block to the next (the online softmax's rescaling)."""
    q, k, v = operands(batch, seq, heads, kv_heads, d, dv, seed=seq, logit_scale=3.0)
    ref = attention_reference if scale is None else scaled_reference(scale)
    fast = lambda q, k, v: flash.flash_attention(q, k, v, scale)  # noqa: E731
    np.testing.assert_allclose(jax.jit(fast)(q, k, v), jax.jit(ref)(q, k, v), rtol=1e-5, atol=1e-5)
    loss = lambda f: lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v)))  # noqa: E731
    g_fast = jax.jit(jax.grad(loss(fast), argnums=(0, 1, 2)))(q, k, v)
    g_ref = jax.jit(jax.grad(loss(ref), argnums=(0, 1, 2)))(q, k, v)
    for name, a, b in zip("qkv", g_fast, g_ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5, err_msg=f"d{name}")


def test_bits_do_not_depend_on_the_cpu_count():
    """Each work unit sums in a fixed order on one thread: one CPU and all of them give the same bits."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 CPUs")
    q, k, v = operands(2, 200, 4, 2, 16, 16, seed=3)
    grads = jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(jnp.sin(flash.flash_attention(q, k, v))), argnums=(0, 1, 2)))
    everyone = os.sched_getaffinity(0)

    def pin(cpus):  # every thread of the process: the kernel runs on one of XLA's
        for tid in os.listdir("/proc/self/task"):
            os.sched_setaffinity(int(tid), cpus)

    all_cpus = jax.block_until_ready(grads(q, k, v))
    try:
        pin({min(everyone)})
        one_cpu = jax.block_until_ready(grads(q, k, v))
    finally:
        pin(everyone)
    for x, y in zip(jax.tree.leaves(all_cpus), jax.tree.leaves(one_cpu)):
        np.testing.assert_array_equal(x, y)


def test_refuses_misshapen_operands():
    q, k, v = operands(1, 8, 3, 2, 4, 4, seed=0)
    with pytest.raises(ValueError, match=r"K dividing H and d, dv >= 1, got q float32\[1, 8, 3, 4\], k float32\[1, 8, 2, 4\]"):
        flash.flash_attention(q, k, v)
    q, k, v = operands(1, 8, 2, 2, 4, 4, seed=0)
    with pytest.raises(ValueError, match=r"float32 q .* got q bfloat16"):
        flash.flash_attention(q.astype(jnp.bfloat16), k, v)
    with pytest.raises(ValueError, match=r"v float32\[1, 7, 2, 4\]"):
        flash.flash_attention(q, k, v[:, :7])


def test_pick_kernel(monkeypatch):
    """auto: flash where MKL can run (large enough, float32, one device); xla for
    small products, bf16, several devices or CFM_JAX_MATMUL=xla; flash where it cannot run is a
    one-line error; a bad name is refused."""
    big, small = operands(1, 512, 4, 4, 64, 64, seed=0), operands(1, 16, 2, 2, 8, 8, seed=0)
    if not cblas.mkl_unavailable(*big) and flash.available() is None:
        for pays in ("1", "0"):  # the kernel's gain is its own: taken whether or not MKL's sgemm beats XLA's dot
            monkeypatch.setenv(mkl_calibration.ENV, pays)
            assert pick_kernel("auto", *big) == "flash"
        assert pick_kernel("flash", *small) == "flash"
    assert pick_kernel("auto", *small) == "xla" and pick_kernel("xla", *big) == "xla"
    assert pick_kernel("auto", *(x.astype(jnp.bfloat16) for x in big)) == "xla"
    with cblas.forced("xla"):
        assert pick_kernel("auto", *big) == "xla"
        with pytest.raises(UserError, match="kernel=flash cannot run: CFM_JAX_MATMUL=xla"):
            pick_kernel("flash", *big)
    with pytest.raises(UserError, match="model.mixer.kernel='fused' is not an attention kernel; allowed: auto, flash, xla"):
        pick_kernel("fused", *big)
    monkeypatch.setattr(jax, "device_count", lambda: 8)
    assert pick_kernel("auto", *big) == "xla"


def test_attention_layer_same_under_both_kernels():
    """The layer's output and parameter gradients with kernel=flash and kernel=xla (block-causal)."""
    ctx = LayerContext(d_model=64, n_layers=1, layer=0, init_std=0.1)
    x = jax.random.normal(jax.random.key(4), (2, 150, 64))
    results = []
    for kernel in ("flash", "xla"):
        module = Attention(AttentionConfig(n_heads=4, n_kv_heads=2, causal_block=32, kernel=kernel), ctx, rngs=nnx.Rngs(0))
        graphdef, params = nnx.split(module)

        def loss(p, x):
            return jnp.sum(jnp.sin(nnx.merge(graphdef, p)(x)[0]))

        results.append(jax.jit(jax.value_and_grad(loss))(params, x))
    (l_flash, g_flash), (l_xla, g_xla) = results
    np.testing.assert_allclose(l_flash, l_xla, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g_flash), jax.tree.leaves(g_xla)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_training_memory_is_linear_in_length():
    """Compiled temp memory of the kernel's gradient doubles (not quadruples) when the length doubles:
    no (seq, seq) matrix exists, and its scratch (a few tiles per thread) is outside XLA's buffers."""
    def temp_bytes(s):
        q = jnp.zeros((1, s, 2, 16))
        grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(flash.flash_attention(q, k, v)), argnums=(0, 1, 2)))
        return grad.lower(q, q, q).compile().memory_analysis().temp_size_in_bytes

    assert temp_bytes(8192) / temp_bytes(4096) < 2.2


def test_refuses_zero_width_heads():
    """d or dv of 0 would hand BLAS zero strides (it skips the products and leaves scratch behind)."""
    q, k, v = operands(1, 8, 2, 2, 4, 4, seed=0)
    with pytest.raises(ValueError, match="d, dv >= 1"):
        flash.flash_attention(q, k, v[..., :0])
    with pytest.raises(ValueError, match="d, dv >= 1"):
        flash.flash_attention(q[..., :0], k[..., :0], v, scale=1.0)
