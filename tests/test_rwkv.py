"""Mixer `rwkv` (RWKV-6 time-mix): chunked kernel with the bonus term == sequential reference
(outputs, final state, gradients), decode == parallel forward, bf16 stability, accounting."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from baselines.rwkv import RWKV6, RWKVConfig
from baselines.gated_linear_attention import HORIZON_MAX, gla_chunked, gla_reference
from cfm_jax.errors import UserError
from cfm_jax.registry import LayerContext

FLA_RTOL = 0.005  # flash-linear-attention's RWKV-6 test: relative RMSE of outputs and gradients
B, L, H, K, V = 2, 63, 2, 4, 4  # L is not a multiple of the chunk
CHUNK, SUB = 16, 4


def rel_rmse(actual, expected) -> float:
    return float(jnp.sqrt(jnp.mean((actual - expected) ** 2)) / jnp.sqrt(jnp.mean(expected**2)))


@pytest.mark.parametrize("scan,per_step", [("matmul", 1), ("matmul", 3), ("sequential", None)])
def test_chunked_matches_reference(scan, per_step):
    """Nonzero initial state; head 0 decays strongly (RWKV log w down to -e^4 ~ -55 per token) at the
    start of each chunk, head 1 gently: the exclusive decays of RWKV-6 must not blow up."""
    ks = jax.random.split(jax.random.key(0), 6)
    r, k = (jax.random.normal(key, (B, L, H, K)) for key in ks[:2])
    v = jax.random.normal(ks[2], (B, L, H, V))
    strength = jnp.where(jnp.arange(L)[:, None] % CHUNK < 4, jnp.array([55.0, 0.05]), jnp.array([0.5, 0.05]))
    lw = -strength[None, :, :, None] * jax.random.uniform(ks[3], (B, L, H, K))
    s0, u = jax.random.normal(ks[4], (B, H, K, V)), jax.random.normal(ks[5], (H, K))
    wo, ws = jax.random.normal(jax.random.key(7), (B, L, H, V)), jax.random.normal(jax.random.key(8), (B, H, K, V))

    def run(kernel):
        def loss(*a):
            o, S = kernel(*a[:5], bonus=a[5])
            return jnp.sum(o * wo) + jnp.sum(S * ws), (o, S)

        return jax.jit(jax.value_and_grad(loss, argnums=tuple(range(6)), has_aux=True))(r, k, v, lw, s0, u)

    (_, (o_ref, S_ref)), g_ref = run(gla_reference)
    (_, (o, S)), g = run(lambda *a, bonus: gla_chunked(*a, bonus=bonus, chunk=CHUNK, sub_chunk=SUB, scan=scan,
                                                           chunks_per_step=per_step))
    assert rel_rmse(o, o_ref) < FLA_RTOL and rel_rmse(S, S_ref) < FLA_RTOL
    for name, a, b in zip("r k v log_w s0 u".split(), g, g_ref):
        assert bool(jnp.all(jnp.isfinite(a))), name
        assert rel_rmse(a, b) < FLA_RTOL, name


def build(d_model: int = 32, layer: int = 1, **overrides) -> RWKV6:
    cfg = RWKVConfig(chunk_size=CHUNK, sub_chunk=SUB, **overrides)
    cfg.validate(d_model)
    return RWKV6(cfg, LayerContext(d_model, 3, layer, 0.1), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("scan", ["matmul", "sequential"])
def test_decode_matches_forward(scan):
    """Token-by-token `step` (carrying the token-shift input) == the chunked forward over several chunks."""
    module = build(scan=scan)
    x = jax.random.normal(jax.random.key(1), (2, 37, 32))
    y, _ = nnx.jit(lambda m, x: m(x))(module, x)
    step = nnx.jit(lambda m, xt, s: m.step(xt, s))
    state, outs = module.init_state(2, 37), []
    for t in range(x.shape[1]):
        yt, state = step(module, x[:, t], state)
        outs.append(yt)
    np.testing.assert_allclose(jnp.stack(outs, axis=1), y, rtol=1e-4, atol=1e-5)


def test_bf16_long_sequence_is_finite():
    module = build(d_model=16, n_heads=2)
    x = jax.random.normal(jax.random.key(2), (1, 2048, 16), jnp.bfloat16) * 3
    y, aux = nnx.jit(lambda m, x: m(x))(module, x)
    assert bool(jnp.all(jnp.isfinite(y))) and bool(jnp.isfinite(aux["stats"]["memory_horizon"]))


def test_init_and_accounting():
    module = build(d_model=32, n_heads=4)
    w0 = np.asarray(module.w0[...])
    assert w0[0] == pytest.approx(-6.0) and w0[-1] == pytest.approx(-1.0)  # RWKV-6 decay_speed ramp
    assert module.state_bytes(16) == module.state_bytes(10_000) == (4 * 8 * 8 + 32) * 4  # H head^2 + shift
    assert module.flops_per_token(16) == module.flops_per_token(10_000) > 0
    n_params = sum(p.size for p in jax.tree.leaves(nnx.state(module, nnx.Param)))
    assert module.cfg.param_count(32) == n_params
    # Zero input: log w = -exp(w0), so the horizon is read from w0 alone.
    assert np.allclose(module.decay_stats(), -np.exp(w0), rtol=1e-6)
    x = jax.random.normal(jax.random.key(3), (2, 20, 32))
    assert 0 < module.memory_horizon(0.5, x) < module.memory_horizon(0.01, x) < HORIZON_MAX


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"n_heads": 5}, "n_heads=5 must be >= 1 and divide"),
        ({"sub_chunk": 3}, "sub_chunk=3"),
        ({"scan": "fast"}, "scan='fast' is not one of"),
        ({"decay_low_rank": 0}, "decay_low_rank=0"),
    ],
)
def test_bad_config(overrides, match):
    with pytest.raises(UserError, match=match):
        RWKVConfig(**overrides).validate(32)
