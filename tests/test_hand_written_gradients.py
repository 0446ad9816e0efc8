"""Elementwise pieces with hand-written backward passes == their autodiff references: RMSNorm (vs
flax's nnx.RMSNorm), SwiGLU, and the one-pass RoPE (vs the textbook rotate-half form)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cfm_jax.layers.common import RMSNorm, rope
from cfm_jax.layers.dense_ffn import swiglu, swiglu_reference


def grads(fn, *args):
    """Value and gradients of sum(sin(fn(*args))) in every argument (float32 loss)."""
    loss = lambda *a: jnp.sum(jnp.sin(fn(*a).astype(jnp.float32)))  # noqa: E731
    return jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(args)))))(*args)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)])
def test_rms_norm_matches_flax(dtype, tol):
    ours, ref = (cls(24, epsilon=1e-6, rngs=nnx.Rngs(0)) for cls in (RMSNorm, nnx.RMSNorm))
    scale = jax.random.normal(jax.random.key(1), (24,))
    x = (jax.random.normal(jax.random.key(2), (3, 7, 24)) * 3).astype(dtype)

    def apply(module):
        # Our RMSNorm returns x's dtype (a float32 scale must not lift bfloat16 activations to float32);
        # flax's promotes to float32: its result, cast back to x's dtype, is the reference.
        graphdef, _ = nnx.split(module)
        return lambda s, x: nnx.merge(graphdef, nnx.State({"scale": nnx.Param(s)}))(x).astype(x.dtype)

    assert apply(ours)(scale, x).dtype == dtype
    np.testing.assert_allclose(apply(ours)(scale, x), apply(ref)(scale, x), rtol=tol, atol=tol)
    (l_ours, g_ours), (l_ref, g_ref) = grads(apply(ours), scale, x), grads(apply(ref), scale, x)
    np.testing.assert_allclose(l_ours, l_ref, rtol=tol)
    for name, a, b in zip(("scale", "x"), g_ours, g_ref):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol, err_msg=name)


def test_rms_norm_with_a_mask_is_flax_s():
    ours, ref = (cls(8, rngs=nnx.Rngs(0)) for cls in (RMSNorm, nnx.RMSNorm))
    x = jax.random.normal(jax.random.key(3), (2, 5, 8))
    mask = jax.random.bernoulli(jax.random.key(4), 0.7, (2, 5, 8))
    np.testing.assert_allclose(ours(x, mask), ref(x, mask), rtol=1e-6)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_swiglu_matches_autodiff(dtype, tol):
    gu = (jax.random.normal(jax.random.key(5), (37, 2 * 24)) * 3).astype(dtype)
    (l_fast, (g_fast,)), (l_ref, (g_ref,)) = grads(swiglu, gu), grads(swiglu_reference, gu)
    np.testing.assert_allclose(l_fast, l_ref, rtol=tol)
    np.testing.assert_allclose(np.asarray(g_fast, np.float32), np.asarray(g_ref, np.float32), rtol=tol, atol=tol)


def rope_textbook(x, positions, theta):
    """[x1 cos - x2 sin, x2 cos + x1 sin] over the two halves of head_dim."""
    half = x.shape[-1] // 2
    angles = positions[..., None].astype(jnp.float32) * theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = angles if angles.ndim == 3 else angles[None]
    cos, sin = jnp.cos(angles)[:, :, None], jnp.sin(angles)[:, :, None]
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


@pytest.mark.parametrize("per_sequence", [False, True])
def test_rope_matches_textbook(per_sequence):
    x = jax.random.normal(jax.random.key(6), (2, 33, 3, 16))
    positions = jnp.arange(66).reshape(2, 33) if per_sequence else jnp.arange(33)
    (l_fast, (g_fast,)), (l_ref, (g_ref,)) = (grads(lambda x: f(x, positions, 1e4), x) for f in (rope, rope_textbook))
    np.testing.assert_allclose(rope(x, positions, 1e4), rope_textbook(x, positions, 1e4), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(l_fast, l_ref, rtol=1e-5)
    np.testing.assert_allclose(g_fast, g_ref, rtol=1e-5, atol=1e-6)


def test_forward_mode_through_the_model_under_xla():
    """CFM_JAX_MATMUL=xla makes the whole model plain autodiff (the MKL matmul, the flash kernel and
    the hand-written norm and SwiGLU backward passes define VJPs only), so jax.jvp works and its
    directional derivative equals the reverse-mode gradient's (computed on the default paths)."""
    from cfm_jax.config import ModelConfig
    from cfm_jax.kernels import cblas
    from cfm_jax.layers.model import LanguageModel

    model = LanguageModel(ModelConfig(d_model=32, n_layers=2), 16, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    tokens = jax.random.randint(jax.random.key(7), (2, 12), 0, 16)
    direction = jax.tree.map(lambda p: jax.random.normal(jax.random.key(8), p.shape), params)

    def loss(p):
        logits, aux = nnx.merge(graphdef, p)(tokens)
        return jnp.mean(logits**2) + aux["loss"]

    with cblas.forced("xla"):  # read when traced
        _, forward = jax.jit(lambda p, d: jax.jvp(loss, (p,), (d,)))(params, direction)
    grads = jax.jit(jax.grad(loss))(params)
    reverse = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
    np.testing.assert_allclose(forward, reverse, rtol=2e-4)
