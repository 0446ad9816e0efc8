"""The short causal conv (Based / GLA / Mamba's token mixing before the recurrence) against a plain
per-channel numpy-style convolution: outputs, gradients, causality and token-by-token decoding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cfm_jax.layers.short_conv import ShortConv, short_conv_reference


@pytest.mark.parametrize("size, length", [(1, 5), (3, 2), (4, 17)])
def test_matches_reference_outputs_and_gradients(size, length):
    conv = ShortConv(6, size, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, length, 6))
    probe = jax.random.normal(jax.random.key(2), (2, length, 6))
    graphdef, params = nnx.split(conv)
    loss_fast = lambda x, params: jnp.sum(nnx.merge(graphdef, params)(x) * probe)
    loss_ref = lambda x, w, b: jnp.sum(short_conv_reference(x, w, b) * probe)
    w, b = conv.w[...], conv.b[...]
    np.testing.assert_allclose(conv(x), short_conv_reference(x, w, b), rtol=1e-5, atol=1e-6)
    gx, gp = jax.grad(loss_fast, argnums=(0, 1))(x, params)
    g_ref = jax.grad(loss_ref, argnums=(0, 1, 2))(x, w, b)
    for a, r in zip((gx, gp["w"][...], gp["b"][...]), g_ref):
        np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-6)


def test_causal_and_decode_matches_forward():
    conv = ShortConv(5, 4, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(3), (2, 11, 5))
    changed = x.at[:, 7].add(1.0)
    np.testing.assert_array_equal(conv(x)[:, :7], conv(changed)[:, :7])
    assert not np.allclose(conv(x)[:, 7], conv(changed)[:, 7])
    state, outs = conv.init_state(2), []
    for t in range(x.shape[1]):
        y, state = conv.step(x[:, t], state)
        outs.append(y)
    np.testing.assert_allclose(jnp.stack(outs, axis=1), conv(x), rtol=1e-5, atol=1e-6)
    assert conv.state_bytes() == 3 * 5 * 4
