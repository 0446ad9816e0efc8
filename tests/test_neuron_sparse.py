"""The neuron-sparse FFN: activation forms, FATReLU, top-k, the L1 schedule, statistics, gather path."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cfm_jax.config import resolve
from cfm_jax.errors import UserError
from cfm_jax.layers.activation_stats import activation_stats
from cfm_jax.layers.neuron_sparse import NeuronSparseConfig, NeuronSparseFFN, l1_coefficient
from cfm_jax.layers.sparse_decode import choose_budget, gather_ffn_step, prepare
from cfm_jax.registry import LayerContext

CTX = LayerContext(d_model=16, n_layers=1, layer=0, init_std=0.3)
ACTIVATIONS = ["relu", "relu2", "reglu", "relu2_glu", "drelu"]


def make(**kw) -> NeuronSparseFFN:
    cfg = NeuronSparseConfig(**kw)
    cfg.validate(16)
    return NeuronSparseFFN(cfg, CTX, rngs=nnx.Rngs(0))


def x_batch(seed=1, shape=(2, 7, 16)):
    return jax.random.normal(jax.random.key(seed), shape)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activation_formulas(activation):
    ffn, x = make(activation=activation, threshold=0.1), np.asarray(x_batch())
    up = x @ np.asarray(ffn.up.kernel[...])
    gate = x @ np.asarray(ffn.gate.kernel[...]) if ffn.gate is not None else None
    fat = lambda v: np.where(v > 0.1, v, 0.0)
    expected = {
        "relu": lambda: fat(up), "relu2": lambda: fat(up) ** 2, "reglu": lambda: fat(gate) * up,
        "relu2_glu": lambda: fat(gate) ** 2 * up, "drelu": lambda: fat(gate) * fat(up),
    }[activation]()
    np.testing.assert_allclose(ffn.hidden(jnp.asarray(x)), expected, rtol=1e-5, atol=1e-6)
    y, aux = ffn(jnp.asarray(x))
    np.testing.assert_allclose(y, expected @ np.asarray(ffn.down.kernel[...]), rtol=1e-5, atol=1e-5)
    assert 0 < float(aux["stats"]["activation_ratio"]) < 1


def test_threshold_raises_sparsity():
    ratios = [float(make(threshold=t)(x_batch())[1]["stats"]["activation_ratio"]) for t in (0.0, 0.2, 0.5)]
    assert ratios[0] > ratios[1] > ratios[2]


def test_top_k_keeps_exactly_k():
    ffn = make(activation="relu2_glu", top_k=5)
    a = ffn.hidden(x_batch())
    counts = np.asarray(jnp.sum(a != 0, axis=-1))
    assert np.all(counts == 5)
    dense = make(activation="relu2_glu").hidden(x_batch())  # same init seed: same weights
    kept = np.sort(np.abs(np.asarray(dense)), axis=-1)[..., -5:]
    np.testing.assert_allclose(np.sort(np.abs(np.asarray(a)), axis=-1)[..., -5:], kept, rtol=1e-6)


def test_l1_schedule_values():
    const = NeuronSparseConfig(l1_coef=0.4)
    assert float(l1_coefficient(const, 0)) == pytest.approx(0.4)
    pro = NeuronSparseConfig(l1_coef=0.4, l1_schedule="prosparse", l1_stages=4, l1_stage_steps=100)
    values = {s: float(l1_coefficient(pro, s)) for s in (0, 50, 100, 150, 399, 400, 10_000)}
    assert values[0] == 0.0
    assert values[50] == pytest.approx(0.1 * math.sin(math.pi / 4), rel=1e-5)  # halfway up stage 1
    assert values[100] == pytest.approx(0.1, rel=1e-5)  # stage 1 done
    assert values[150] == pytest.approx(0.1 + 0.1 * math.sin(math.pi / 4), rel=1e-5)
    assert values[400] == values[10_000] == pytest.approx(0.4)
    steps = np.arange(0, 500)
    curve = np.asarray([float(l1_coefficient(pro, s)) for s in steps])
    assert np.all(np.diff(curve) >= -1e-7), "the coefficient never decreases"


def test_l1_penalty_is_the_aux_loss_and_follows_the_training_step():
    ffn = make(l1_coef=0.5, l1_schedule="prosparse", l1_stages=2, l1_stage_steps=10)
    x = x_batch()
    a = ffn.hidden(x)
    _, aux = ffn(x)
    assert float(aux["loss"]) == 0.0  # step 0: coefficient 0
    ffn.train_step[...] = jnp.int32(20)
    _, aux = ffn(x)
    np.testing.assert_allclose(float(aux["loss"]), 0.5 * float(jnp.mean(jnp.abs(a))), rtol=1e-6)


def test_activation_stats_on_hand_built_activations():
    # 1 sequence, 8 tokens, 20 neurons. Token t activates neurons {0..t} -> counts 1..8.
    h = np.zeros((1, 8, 20), np.float32)
    for t in range(8):
        h[0, t, : t + 1] = 1.0
    stats = {k: float(v) for k, v in activation_stats(jnp.asarray(h)).items()}
    assert stats["activation_ratio"] == pytest.approx(36 / 160)
    assert stats["active_mean"] == pytest.approx(4.5) and stats["active_max"] == 8
    assert stats["active_p50"] == pytest.approx(4.5)
    assert stats["union_ratio_8"] == pytest.approx(8 / 20)  # one chunk of 8: neurons 0..7
    assert stats["union_ratio_64"] == pytest.approx(8 / 20)  # clipped to the sequence
    assert stats["union_ratio_batch"] == pytest.approx(8 / 20)
    # Neuron i fires 8 - i times (i < 8); the top 10 % = 2 neurons take 8 + 7 of 36 activations.
    assert stats["top10_share"] == pytest.approx(15 / 36)


def test_union_over_chunks_of_8():
    h = np.zeros((1, 16, 10), np.float32)
    h[0, :8, 0] = 1.0  # chunk 1 uses neuron 0
    h[0, 8:, 1:3] = 1.0  # chunk 2 uses neurons 1, 2
    stats = activation_stats(jnp.asarray(h))
    assert float(stats["union_ratio_8"]) == pytest.approx((1 / 10 + 2 / 10) / 2)
    assert float(stats["union_ratio_batch"]) == pytest.approx(3 / 10)


@pytest.mark.parametrize("seq", [5, 64, 130, 200])
def test_union_ratios_match_a_direct_count(seq):
    """union_ratio_64 (derived from the chunks of 8) and union_ratio_batch (from the per-neuron counts)
    == counting straight from the mask, numpy loops; lengths under, at and past a chunk of 64."""
    h = np.asarray(jax.nn.relu(jax.random.normal(jax.random.key(seq), (2, seq, 24)) - 2.0))
    active = h != 0
    stats = activation_stats(jnp.asarray(h))
    for chunk in (8, 64):
        c = min(chunk, seq)
        unions = [active[b, j * c:(j + 1) * c].any(axis=0).mean() for b in range(2) for j in range(seq // c)]
        assert float(stats[f"union_ratio_{chunk}"]) == pytest.approx(np.mean(unions), rel=1e-6)
    assert float(stats["union_ratio_batch"]) == pytest.approx(active.any(axis=(0, 1)).mean(), rel=1e-6)
    assert float(stats["activation_ratio"]) == pytest.approx(active.mean(), rel=1e-6)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gather_path_equals_dense_without_overflow(activation):
    ffn = make(activation=activation, threshold=0.05)
    weights = prepare(ffn)
    step = jax.jit(lambda x: gather_ffn_step(ffn, weights, x, budget=64))
    for seed in range(4):
        x = x_batch(seed, (16,))
        y, n_active, overflowed = step(x)
        dense, _ = ffn(x[None, None])
        assert not bool(overflowed) and 0 < int(n_active) <= 64
        np.testing.assert_allclose(y, dense[0, 0], rtol=1e-5, atol=1e-6)


def test_gather_path_gradients_match_dense():
    ffn = make(activation="reglu")
    x = x_batch(3, (16,))
    weights = prepare(ffn)
    g_sparse = jax.grad(lambda w: jnp.sum(jnp.sin(gather_ffn_step(ffn, w, x, 64)[0])))(weights)
    g_dense = jax.grad(lambda k: jnp.sum(jnp.sin((jax.nn.relu(x @ k[0]) * (x @ k[1])) @ k[2])))(
        (weights.selector, weights.up_rows.T, weights.down_rows))
    np.testing.assert_allclose(g_sparse.selector, g_dense[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g_sparse.up_rows.T, g_dense[1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g_sparse.down_rows, g_dense[2], rtol=1e-5, atol=1e-6)


def test_gather_overflow_is_reported_and_handled():
    ffn = make(activation="relu")
    weights = prepare(ffn)
    x = x_batch(5, (16,))
    dense = ffn(x[None, None])[0][0, 0]
    n_true = int(jnp.sum(ffn.up(x) > 0))
    y, n_active, overflowed = gather_ffn_step(ffn, weights, x, budget=n_true - 3, overflow="dense")
    assert bool(overflowed) and int(n_active) == n_true
    np.testing.assert_allclose(y, dense, rtol=1e-5, atol=1e-6)  # exact fallback
    y_cut, _, overflowed = gather_ffn_step(ffn, weights, x, budget=n_true - 3, overflow="truncate")
    assert bool(overflowed) and not np.allclose(y_cut, dense)  # approximate: the 3 weakest dropped
    assert choose_budget([1, 2, 3, 100], 50) == 3


@pytest.mark.parametrize("override,fragment", [
    ("model.ffn.threshold=-0.1", "threshold=-0.1 must be >= 0"),
    ("model.ffn.l1_coef=-1", "l1_coef=-1.0 must be >= 0"),
    ("model.ffn.top_k=100000", "top_k=100000 must be in [0, d_ff=256]"),
    ("model.ffn.activation=swish", "allowed: relu, relu2, reglu, relu2_glu, drelu"),
    ("model.ffn.l1_schedule=linear", "allowed: constant, prosparse"),
])
def test_bad_input(override, fragment):
    with pytest.raises(UserError, match=None) as info:
        resolve("smoke", ["model.ffn=neuron_sparse", override])
    assert fragment in str(info.value)


@pytest.mark.parametrize("d,f,ratio", [(40, 96, 0.25), (64, 256, 0.05), (17, 33, 1.0)])
def test_in_place_active_rows_match_the_gathered_reference(d, f, ratio):
    """The benchmark's in-place C++ ceiling == plain JAX gathering the same rows (`active_rows_ffn`),
    with d not a multiple of the 16-lane vectors, an odd and an empty active set, and an index out
    of range ignored."""
    from cfm_jax.bench import active_rows_ffn
    from cfm_jax.kernels import active_rows

    if why := active_rows.available():
        pytest.skip(why)
    ks = jax.random.split(jax.random.key(f), 3)
    x, up_rows, down = jax.random.normal(ks[0], (d,)), jax.random.normal(ks[1], (f, d)), jax.random.normal(ks[2], (f, d))
    pre = np.asarray(up_rows @ x)
    threshold = float(np.quantile(pre, 1 - ratio)) if ratio < 1 else -1e9
    active = jnp.asarray(np.flatnonzero(pre > threshold), jnp.int32)
    expected = active_rows_ffn(x, up_rows, down, active, threshold)
    np.testing.assert_allclose(active_rows.active_rows_ffn_in_place(x, up_rows, down, active, threshold), expected,
                               rtol=1e-5, atol=1e-4)
    with_stray = jnp.concatenate([active, jnp.array([f + 3], jnp.int32)])
    np.testing.assert_allclose(active_rows.active_rows_ffn_in_place(x, up_rows, down, with_stray, threshold), expected,
                               rtol=1e-5, atol=1e-4)
    empty = active_rows.active_rows_ffn_in_place(x, up_rows, down, jnp.zeros((0,), jnp.int32), threshold)
    np.testing.assert_array_equal(empty, np.zeros(d, np.float32))
