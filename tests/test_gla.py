"""Mixer `gla`: chunked kernel == sequential reference (outputs, final state, gradients), decode ==
parallel forward, bf16 stability, accounting and the memory horizon."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from baselines.gla import GLA, GLAConfig
from baselines.gated_linear_attention import HORIZON_MAX, gla_chunked, gla_reference, horizon, pick_scan
from cfm_jax.errors import UserError
from cfm_jax.registry import LayerContext

FLA_RTOL = 0.005  # flash-linear-attention's GLA test: relative RMSE of outputs and gradients
B, L, H, K, V = 2, 63, 2, 4, 3  # L is not a multiple of the chunk
CHUNK, SUB = 16, 4


def rel_rmse(actual, expected) -> float:
    return float(jnp.sqrt(jnp.mean((actual - expected) ** 2)) / jnp.sqrt(jnp.mean(expected**2)))


def kernel_inputs(G: int, seed: int = 0):
    """q, k, v, log-decays, a nonzero initial state. Head 0 decays strongly (down to -40 per token,
    cumulative ~-600 per chunk), head 1 gently, and the strong steps sit at the start of each chunk,
    the case where differences of long cumulative sums lose precision."""
    ks = jax.random.split(jax.random.key(seed), 5)
    q, k = (jax.random.normal(key, (B, L, H, K)) for key in ks[:2])
    v = jax.random.normal(ks[2], (B, L, H, V))
    strength = jnp.where(jnp.arange(L)[:, None] % CHUNK < 4, jnp.array([40.0, 0.05]), jnp.array([0.5, 0.05]))
    la = -strength[None, :, :, None] * jax.random.uniform(ks[3], (B, L, H, G))
    s0 = jax.random.normal(ks[4], (B, H, K, V))
    return q, k, v, la, s0


def outputs_and_grads(kernel, args):
    """Outputs, final state and the gradients of a random linear functional of both w.r.t. every input."""
    wo, ws = jax.random.normal(jax.random.key(7), (B, L, H, V)), jax.random.normal(jax.random.key(8), (B, H, K, V))

    def loss(*a):
        o, S = kernel(*a)
        return jnp.sum(o * wo) + jnp.sum(S * ws), (o, S)

    (_, (o, S)), grads = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(args))), has_aux=True))(*args)
    return o, S, grads


@pytest.mark.parametrize("scan,per_step", [("matmul", 1), ("matmul", 3), ("matmul", None), ("sequential", None)])
@pytest.mark.parametrize("G", [K, 1], ids=["per_dim", "per_head"])
def test_chunked_matches_reference(G, scan, per_step):
    """per_step: chunks side by side per scan step (3 does not divide the 4 chunks: a padded group)."""
    args = kernel_inputs(G)
    o_ref, S_ref, g_ref = outputs_and_grads(gla_reference, args)
    o, S, g = outputs_and_grads(
        lambda *a: gla_chunked(*a, chunk=CHUNK, sub_chunk=SUB, scan=scan, chunks_per_step=per_step), args)
    assert rel_rmse(o, o_ref) < FLA_RTOL and rel_rmse(S, S_ref) < FLA_RTOL
    for name, a, b in zip("q k v log_decay s0".split(), g, g_ref):
        assert bool(jnp.all(jnp.isfinite(a))), name
        assert rel_rmse(a, b) < FLA_RTOL, name


def build(d_model: int = 32, **overrides) -> GLA:
    cfg = GLAConfig(chunk_size=CHUNK, sub_chunk=SUB, **overrides)
    cfg.validate(d_model)
    return GLA(cfg, LayerContext(d_model, 2, 0, 0.1), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("scan, conv_size", [("matmul", 0), ("sequential", 0), ("sequential", 4)])
@pytest.mark.parametrize("gate", ["per_dim", "per_head"])
def test_decode_matches_forward(gate, scan, conv_size):
    """Token-by-token `step` == the chunked forward over several chunks and a partial one (with the
    short conv, its last inputs carried in the state)."""
    module = build(gate=gate, scan=scan, conv_size=conv_size)
    x = jax.random.normal(jax.random.key(1), (2, 37, 32))
    y, _ = nnx.jit(lambda m, x: m(x))(module, x)
    step = nnx.jit(lambda m, xt, s: m.step(xt, s))
    state, outs = module.init_state(2, 37), []
    for t in range(x.shape[1]):
        yt, state = step(module, x[:, t], state)
        outs.append(yt)
    np.testing.assert_allclose(jnp.stack(outs, axis=1), y, rtol=1e-4, atol=1e-5)


def test_bf16_long_sequence_is_finite():
    """bf16 inputs over 2048 tokens: the state and decays stay fp32, nothing overflows."""
    module = build(d_model=16, n_heads=2)
    x = jax.random.normal(jax.random.key(2), (1, 2048, 16), jnp.bfloat16) * 3
    y, aux = nnx.jit(lambda m, x: m(x))(module, x)
    assert bool(jnp.all(jnp.isfinite(y))) and bool(jnp.isfinite(aux["stats"]["memory_horizon"]))
    q, k, v, la, _ = (a.astype(jnp.bfloat16) for a in kernel_inputs(K))
    o, S = gla_chunked(q, k, v, la * 10, chunk=CHUNK, sub_chunk=SUB)
    assert S.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(o))) and bool(jnp.all(jnp.isfinite(S)))


@pytest.mark.parametrize("gate, conv_size", [("per_dim", 0), ("per_head", 0), ("per_dim", 4)])
def test_accounting(gate, conv_size):
    module = build(d_model=32, gate=gate, n_heads=4, conv_size=conv_size)
    conv = 3 * (2 * 16 + 32) * 4 if conv_size else 0  # last 3 inputs of q, k, v (2 K + V channels)
    assert module.state_bytes(16) == module.state_bytes(10_000) == 4 * 4 * 8 * 4 + conv  # H d_k d_v, fp32 (d_k = 16 / 4, d_v = 32 / 4)
    assert module.flops_per_token(16) == module.flops_per_token(10_000) > 0
    n_params = sum(p.size for p in jax.tree.leaves(nnx.state(module, nnx.Param)))
    assert module.cfg.param_count(32) == n_params


def test_memory_horizon():
    # Constant decay a on every channel: a^n = threshold at n = ln(threshold) / ln(a).
    assert float(horizon(jnp.full((8,), -0.01))) == pytest.approx(math.log(100) / 0.01, rel=1e-4)
    assert float(horizon(jnp.full((8,), -0.01), 0.5)) == pytest.approx(math.log(2) / 0.01, rel=1e-4)
    assert float(horizon(jnp.zeros((8,)))) == pytest.approx(HORIZON_MAX)  # no decay: never forgets
    module = build()
    # Zero input: log alpha = logsigmoid(0) / 16 on every channel (zero gate bias at init).
    expected = math.log(100) / (math.log(2) / 16)
    assert module.memory_horizon() == pytest.approx(expected, rel=1e-4)
    assert module.decay_stats().shape == (16,)
    x = jax.random.normal(jax.random.key(3), (2, 20, 32))
    assert 0 < module.memory_horizon(0.5, x) < module.memory_horizon(0.01, x) < HORIZON_MAX
    with pytest.raises(ValueError):
        module.memory_horizon(1.5)


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"n_heads": 3}, "n_heads=3 must divide the key width 16"),
        ({"n_heads": 0}, "n_heads=0"),
        ({"expand_k": 0.01}, "expand_k=0.01 gives a key width of 0"),
        ({"sub_chunk": 5}, "sub_chunk=5"),
        ({"scan": "fast"}, "scan='fast' is not one of"),
        ({"gate_low_rank": 0}, "gate_low_rank=0"),
    ],
)
def test_bad_config(overrides, match):
    with pytest.raises(UserError, match=match):
        GLAConfig(**overrides).validate(32)


def test_auto_scan_picks_by_head_state():
    """`auto` on a CPU runs small head states token by token and large ones in matmul form; on an
    accelerator always matmul."""
    assert pick_scan("auto", 16, 16, "cpu") == "sequential" and pick_scan("auto", 64, 64, "cpu") == "matmul"
    assert pick_scan("auto", 16, 16, "gpu") == "matmul"
    assert pick_scan("matmul", 4, 4) == "matmul" and pick_scan("sequential", 64, 64) == "sequential"
