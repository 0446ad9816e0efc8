"""Sliding-window attention with sinks: blocked == full-mask reference (outputs, gradients), the mask,
ring-buffer decode == forward over several wrap-arounds, bounded memory and cache, config errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from baselines.sliding_window import (
    SlidingWindow, SlidingWindowConfig, sliding_window_blocked, sliding_window_reference, visible,
)
from cfm_jax.config import resolve
from cfm_jax.errors import UserError
from cfm_jax.layers.attention import attention_reference
from cfm_jax.registry import LayerContext


def test_mask_is_sinks_plus_window():
    pos = jnp.arange(8)
    mask = np.asarray(visible(pos[:, None], pos[None, :], 3, 2)).astype(int)
    assert mask[7].tolist() == [1, 1, 0, 0, 0, 1, 1, 1]  # sinks 0, 1 and the window 5..7
    assert mask[3].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]  # sink and window overlap: still once each
    assert (np.triu(mask, 1) == 0).all()


def qkv(length: int, heads: int = 4, kv_heads: int = 2, hd: int = 8, seed: int = 0):
    ks = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(ks[0], (2, length, heads, hd)), jax.random.normal(ks[1], (2, length, kv_heads, hd)),
            jax.random.normal(ks[2], (2, length, kv_heads, hd)))


@pytest.mark.parametrize("length,window,sinks,block", [
    (63, 8, 2, 16),  # length not a multiple of the block
    (40, 5, 0, 7),  # no sinks
    (33, 1, 3, 4),  # the window is the token itself
])
def test_blocked_matches_reference(length, window, sinks, block):
    q, k, v = qkv(length)

    def with_grads(attend):  # -> (gradients of sum(sin(out)) wrt q, k, v; out), one compilation
        loss = lambda q, k, v: (jnp.sum(jnp.sin(out := attend(q, k, v))), out)
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)

    grads, out = with_grads(lambda q, k, v: sliding_window_blocked(q, k, v, window, sinks, block))
    grads_ref, out_ref = with_grads(lambda q, k, v: sliding_window_reference(q, k, v, window, sinks))
    np.testing.assert_allclose(out, out_ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, grads_ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_window_covering_the_sequence_is_causal_attention():
    """Window and block longer than the sequence: sinks change nothing, plain causal attention."""
    q, k, v = qkv(12)
    blocked = jax.jit(lambda q, k, v: sliding_window_blocked(q, k, v, 50, 4, 64))
    np.testing.assert_allclose(blocked(q, k, v), jax.jit(attention_reference)(q, k, v), rtol=1e-5, atol=1e-5)


def test_training_memory_is_linear_in_length():
    """No intermediate of the blocked path has L^2 elements per head (the reference has)."""
    length, heads = 2048, 2
    q, k, v = qkv(length, heads=heads, kv_heads=1, hd=4)

    def largest(fn) -> int:
        jaxpr = jax.make_jaxpr(fn)(q, k, v).jaxpr
        return max(int(np.prod(var.aval.shape)) for eqn in jaxpr.eqns for var in eqn.outvars)

    assert largest(lambda q, k, v: sliding_window_reference(q, k, v, 16, 4)) >= 2 * heads * length**2
    assert largest(lambda q, k, v: sliding_window_blocked(q, k, v, 16, 4, 32)) < 2 * heads * length * (32 + 16 + 4)


def build(d_model: int = 32, **fields) -> SlidingWindow:
    cfg = SlidingWindowConfig(**fields)
    cfg.validate(d_model)
    return SlidingWindow(cfg, LayerContext(d_model, 2, 0, 0.1), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("fields", [
    dict(window=5, sinks=2, block_size=4),  # 23 tokens: the ring of 5 wraps 3 times past the sinks
    dict(window=4, sinks=0, block_size=8, n_kv_heads=2),
    dict(window=3, sinks=6, block_size=5, n_heads=2),  # more sinks than window
])
def test_ring_buffer_decode_matches_forward(fields):
    module, length = build(**fields), 23
    x = jax.random.normal(jax.random.key(3), (2, length, 32))
    state = module.init_state(2, length)
    assert state["k"].shape[2] == fields["window"] + fields["sinks"]  # the cache never grows
    y, outs, state = forward_and_decode(module, x, state)
    np.testing.assert_allclose(outs, y, rtol=1e-4, atol=1e-5)
    assert int(state["pos"]) == length


def forward_and_decode(module, x, state):
    """x: (batch, seq, d) -> (parallel forward, token-by-token `step` outputs, final state), one compilation."""
    graphdef, params = nnx.split(module)

    @jax.jit
    def run(params, x, state):
        m = nnx.merge(graphdef, params)
        state, ys = jax.lax.scan(lambda s, xt: m.step(xt, s)[::-1], state, jnp.moveaxis(x, 1, 0))
        return m(x)[0], jnp.moveaxis(ys, 0, 1), state

    return run(params, x, state)


def test_accounting():
    cfg = SlidingWindowConfig(window=6, sinks=2, n_kv_heads=2)
    module = build(window=6, sinks=2, n_kv_heads=2)
    per_token = 2 * 2 * 8 * 4  # K and V, 2 kv heads, head_dim 8, fp32
    assert module.state_bytes(5) == 5 * per_token
    assert module.state_bytes(8) == module.state_bytes(10**6) == 8 * per_token
    assert module.flops_per_token(8) == module.flops_per_token(10**6) > module.flops_per_token(4) > 0
    assert cfg.param_count(32) == sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


@pytest.mark.parametrize("override,fragment", [
    ("model.mixer.window=0", "model.mixer.window=0 must be >= 1"),
    ("model.mixer.sinks=-1", "model.mixer.sinks=-1 must be >= 0"),
    ("model.mixer.block_size=0", "model.mixer.block_size=0 must be >= 1"),
    ("model.mixer.n_heads=3", "model.mixer.n_heads=3 must be >= 1 and divide model.d_model=64"),
    ("model.mixer.window=many", "model.mixer.window='many' is not an int"),
    ("model.mixer.kernel=flash", "model.mixer.kernel='flash' selects the causal attention kernel"),
])
def test_bad_config_is_one_line_error(override, fragment):
    with pytest.raises(UserError) as info:
        resolve("smoke", ["model.mixer=sliding_window", override])
    assert fragment in str(info.value) and "\n" not in str(info.value)
