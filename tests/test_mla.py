"""MLA: the forward equals explicit per-head attention over up-projected K/V, the absorbed decode equals
the forward, the cache holds only latent + shared RoPE key, config errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from baselines.mla import MLA, MLAConfig
from cfm_jax.config import resolve
from cfm_jax.errors import UserError
from cfm_jax.layers.attention import Attention, AttentionConfig
from cfm_jax.registry import LayerContext

CTX = LayerContext(32, 2, 0, 0.1)


def build(**fields) -> MLA:
    cfg = MLAConfig(**fields)
    cfg.validate(CTX.d_model)
    return MLA(cfg, CTX, rngs=nnx.Rngs(0))


def test_forward_is_attention_over_up_projected_keys_and_values():
    module, x = build(latent_dim=6, rope_dim=4), jax.random.normal(jax.random.key(1), (2, 11, 32))

    @nnx.jit
    def explicit(module, x):  # plain per-head softmax attention, scores = q_nope.k + q_rope.k_rope
        q_nope, q_rope, latent, k_rope = module._project(x, jnp.arange(11))
        k = jnp.einsum("blc,chd->blhd", latent, module.k_up[...])  # per-head keys, (2, 11, 4, 8)
        v = jnp.einsum("blc,chd->blhd", latent, module.v_up[...])
        scores = jnp.einsum("bqhd,bkhd->bhqk", q_nope, k) + jnp.einsum("bqhr,bkr->bhqk", q_rope, k_rope)
        scores = scores / (8 + 4) ** 0.5
        scores = jnp.where(jnp.tril(jnp.ones((11, 11), bool)), scores, -jnp.inf)
        return module.o_proj(jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, -1), v).reshape(2, 11, 32))

    y, _ = nnx.jit(lambda m, x: m(x))(module, x)
    np.testing.assert_allclose(y, explicit(module, x), rtol=1e-5, atol=1e-6)


def forward_and_decode(module, x, state):
    """x: (batch, seq, d) -> (parallel forward, token-by-token `step` outputs, final state), one compilation."""
    graphdef, params = nnx.split(module)

    @jax.jit
    def run(params, x, state):
        m = nnx.merge(graphdef, params)
        state, ys = jax.lax.scan(lambda s, xt: m.step(xt, s)[::-1], state, jnp.moveaxis(x, 1, 0))
        return m(x)[0], jnp.moveaxis(ys, 0, 1), state

    return run(params, x, state)


@pytest.mark.parametrize("fields", [dict(), dict(latent_dim=3, rope_dim=2, n_heads=2), dict(rope_dim=0, latent_dim=8)])
def test_absorbed_decode_matches_forward(fields):
    module, x = build(**fields), jax.random.normal(jax.random.key(2), (2, 17, 32))
    y, outs, state = forward_and_decode(module, x, module.init_state(2, 20))  # a cache longer than the sequence
    np.testing.assert_allclose(outs, y, rtol=1e-4, atol=1e-5)
    assert int(state["pos"]) == 17


def test_cache_holds_latent_and_rope_key_only():
    module = build(latent_dim=6, rope_dim=4)
    state = module.init_state(3, 50)
    assert state["latent"].shape == (3, 50, 6) and state["k_rope"].shape == (3, 50, 4)
    assert module.state_bytes(100) == (6 + 4) * 100 * 4
    mha = Attention(AttentionConfig(), CTX, rngs=nnx.Rngs(0))
    assert module.state_bytes(100) < mha.state_bytes(100) / 6  # 10 floats per token instead of 64
    assert module.flops_per_token(1000) > module.flops_per_token(10) > 0


@pytest.mark.parametrize("fields", [dict(), dict(latent_dim=5, rope_dim=0, n_heads=8)])
def test_param_count(fields):
    module = build(**fields)
    assert MLAConfig(**fields).param_count(32) == sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


@pytest.mark.parametrize("override,fragment", [
    ("model.mixer.latent_dim=0", "model.mixer.latent_dim=0 must be >= 1"),
    ("model.mixer.rope_dim=3", "model.mixer.rope_dim=3 must be even and >= 0"),
    ("model.mixer.n_heads=5", "model.mixer.n_heads=5 must be >= 1 and divide model.d_model=64"),
    ("model.mixer.rope_theta=0", "model.mixer.rope_theta=0.0 must be > 0"),
    ("model.mixer.causal_block=-1", "model.mixer.causal_block=-1 must be >= 0"),
])
def test_bad_config_is_one_line_error(override, fragment):
    with pytest.raises(UserError) as info:
        resolve("smoke", ["model.mixer=mla", override])
    assert fragment in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("fast", [pytest.param(dict(query_chunk=8), marks=pytest.mark.slow),  # default tier near 10 min
                                  dict(query_chunk=0, causal_block=8)], ids=["chunked", "blocks"])
def test_query_chunked_forward_and_grads_match_unchunked(fast):
    x = jax.random.normal(jax.random.key(3), (2, 37, 32))
    chunked, whole = build(**fast), build(query_chunk=0, causal_block=0)

    def loss(m, x):
        return jnp.sum(jnp.sin(m(x)[0]))

    np.testing.assert_allclose(chunked(x)[0], whole(x)[0], rtol=1e-5, atol=1e-6)
    g_chunk = nnx.grad(loss)(chunked, x)
    g_whole = nnx.grad(loss)(whole, x)
    for a, b in zip(jax.tree.leaves(g_chunk), jax.tree.leaves(g_whole)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
