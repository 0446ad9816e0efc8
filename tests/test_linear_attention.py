"""Linear attention: chunked == sequential reference (outputs, final state, gradients), feature maps,
decode == forward for every normalization, constant state size, config errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from baselines.linear_attention import (
    LinearAttention, LinearAttentionConfig, chunked_linear_attention, feature_map, linear_attention_reference,
    taylor_linear_attention,
)
from cfm_jax.config import resolve
from cfm_jax.errors import UserError
from cfm_jax.registry import LayerContext

REL_RMSE = 1e-3  # flash-linear-attention's tolerance for linear attention (fp32)


def rel_rmse(actual, expected) -> float:
    """fla's get_err_ratio: RMS of the difference over RMS of the reference."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.sqrt(np.mean((actual - expected) ** 2)) / np.sqrt(np.mean(expected**2)))


def random_inputs(kind: str, length: int, seed: int = 0, b: int = 2, h: int = 2, dk: int = 4, dv: int = 5):
    """Feature-mapped q, k: (b, length, h, F); v: (b, length, h, dv); a nonzero initial state."""
    ks = jax.random.split(jax.random.key(seed), 4)
    q = feature_map(jax.random.normal(ks[0], (b, length, h, dk)), kind) * dk**-0.5
    k = feature_map(jax.random.normal(ks[1], (b, length, h, dk)), kind)
    v = jax.random.normal(ks[2], (b, length, h, dv))
    s0 = jax.random.normal(ks[3], (b, h, q.shape[-1], dv))
    return q, k, v, s0


def with_grads(fn, co, cs, argnums=(0, 1, 2, 3)):
    """jit(grad) of a random linear functional of fn(q, k, v, s0)'s (output, final state), returning both too."""
    def loss(q, k, v, s0):
        o, s = fn(q, k, v, s0)
        return jnp.sum(o * co) + jnp.sum(s * cs), (o, s)
    return jax.jit(jax.grad(loss, argnums=argnums, has_aux=True))


# The kernel sees feature-mapped inputs, so the map only changes their statistics (identity: signed).
@pytest.mark.parametrize("kind,length,chunk", [
    ("elu1", 63, 16), ("elu1", 64, 16), ("elu1", 5, 16), ("elu1", 63, 1), ("identity", 63, 16), ("taylor", 63, 16),
])
def test_chunked_matches_reference_outputs_state_and_gradients(kind, length, chunk):
    q, k, v, s0 = random_inputs(kind, length)
    co = jax.random.normal(jax.random.key(7), v.shape)
    cs = jax.random.normal(jax.random.key(8), s0.shape)
    g_ref, (o_ref, s_ref) = with_grads(linear_attention_reference, co, cs)(q, k, v, s0)
    g, (o, s) = with_grads(lambda q, k, v, s0: chunked_linear_attention(q, k, v, chunk, s0), co, cs)(q, k, v, s0)
    assert rel_rmse(o, o_ref) < REL_RMSE and rel_rmse(s, s_ref) < REL_RMSE
    for name, a, b in zip("qkvS", g, g_ref):
        assert rel_rmse(a, b) < REL_RMSE, f"gradient of {name}"


@pytest.mark.parametrize("length,chunk,with_s0", [(63, 16, True), (64, 16, False), (5, 16, False), (5, 16, True), (16, 16, False)])
def test_taylor_form_matches_reference_outputs_state_and_gradients(length, chunk, with_s0):
    """`taylor_linear_attention` (scores from q.k, features only for the state) against the plain scan
    over feature-mapped inputs: outputs, final state and gradients wrt raw q, k, v and the state; and
    without the final state (one chunk from no state: no features at all) the same outputs."""
    ks = jax.random.split(jax.random.key(length), 6)
    b, h, dk, dv = 2, 2, 4, 5
    q, k = (jax.random.normal(kk, (b, length, h, dk)) for kk in ks[:2])
    v = jax.random.normal(ks[2], (b, length, h, dv))
    s0 = jax.random.normal(ks[3], (b, h, 1 + dk + dk * dk, dv)) if with_s0 else None
    co, cs = jax.random.normal(ks[4], v.shape), jax.random.normal(ks[5], (b, h, 1 + dk + dk * dk, dv))

    def reference(q, k, v, s0):
        return linear_attention_reference(feature_map(q, "taylor"), feature_map(k, "taylor"), v, s0)

    argnums = (0, 1, 2, 3) if with_s0 else (0, 1, 2)
    g_ref, (o_ref, s_ref) = with_grads(reference, co, cs, argnums)(q, k, v, s0)
    g, (o, s) = with_grads(lambda q, k, v, s0: taylor_linear_attention(q, k, v, chunk, s0), co, cs, argnums)(q, k, v, s0)
    assert rel_rmse(o, o_ref) < REL_RMSE and rel_rmse(s, s_ref) < REL_RMSE
    for name, a, b_ in zip("qkvS", g, g_ref):
        assert rel_rmse(a, b_) < REL_RMSE, f"gradient of {name}"
    o_only, none = taylor_linear_attention(q, k, v, chunk, s0, with_state=False)
    assert none is None and rel_rmse(o_only, o_ref) < REL_RMSE


def test_taylor_map_approximates_exp():
    """Based's 2nd-order map: phi(q).phi(k) = 1 + q.k/sqrt(d) + (q.k)^2/(2d)."""
    q, k = jax.random.normal(jax.random.key(0), (2, 6))
    dot = float(q @ k) / 6**0.5
    assert float(feature_map(q, "taylor") @ feature_map(k, "taylor")) == pytest.approx(1 + dot + dot**2 / 2, rel=1e-5)
    assert feature_map(q, "taylor").shape == (1 + 6 + 36,)


def build(d_model: int = 32, **fields) -> LinearAttention:
    cfg = LinearAttentionConfig(**fields)
    cfg.validate(d_model)
    return LinearAttention(cfg, LayerContext(d_model, 2, 0, 0.1), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("fields", [
    dict(feature_map="elu1", normalize="sum", chunk_size=4),
    dict(feature_map="taylor", normalize="rms", d_key=3, chunk_size=8),
    dict(feature_map="identity", normalize="none", n_heads=2, chunk_size=5),
    dict(feature_map="taylor", d_key=4, conv_size=3, chunk_size=8),  # Based's block: conv state carried too
])
def test_decode_matches_forward(fields):
    module = build(**fields)
    x = jax.random.normal(jax.random.key(3), (2, 19, 32))
    graphdef, params = nnx.split(module)

    @jax.jit
    def forward_and_decode(params, x):  # one compilation: parallel forward, then `step` token by token
        m = nnx.merge(graphdef, params)
        _, ys = jax.lax.scan(lambda s, xt: m.step(xt, s)[::-1], m.init_state(2, 19), jnp.moveaxis(x, 1, 0))
        return m(x)[0], jnp.moveaxis(ys, 0, 1)

    y, outs = forward_and_decode(params, x)
    np.testing.assert_allclose(outs, y, rtol=1e-4, atol=1e-5)


def test_bf16_long_sequence_stays_finite():
    module = build(feature_map="elu1", normalize="sum")
    x = jax.random.normal(jax.random.key(4), (1, 2048, 32), jnp.bfloat16) * 3
    y, _ = module(x)
    assert bool(jnp.all(jnp.isfinite(y.astype(jnp.float32))))


@pytest.mark.parametrize("fields", [
    dict(), dict(normalize="rms"), dict(feature_map="taylor", d_key=4, normalize="none"), dict(n_heads=2, d_key=6),
    dict(conv_size=4),
])
def test_accounting(fields):
    cfg = LinearAttentionConfig(**fields)
    module = build(**fields)
    conv_state = (cfg.conv_size - 1) * cfg.n_heads * (2 * cfg.key_dim(32) + 32 // cfg.n_heads) * 4 if cfg.conv_size else 0
    assert module.state_bytes(16) == module.state_bytes(10**6) == (
        cfg.n_heads * cfg.feature_dim(32) * cfg.value_dim(32) * 4 + conv_state
    )
    assert cfg.param_count(32) == sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))
    assert module.flops_per_token(16) == module.flops_per_token(10**6) > 0
    assert tuple(module.init_state(3, 7)["S"].shape) == (3, cfg.n_heads, cfg.feature_dim(32), cfg.value_dim(32))


@pytest.mark.parametrize("override,fragment", [
    ("model.mixer.n_heads=3", "model.mixer.n_heads=3 must be >= 1 and divide model.d_model=64"),
    ("model.mixer.chunk_size=0", "model.mixer.chunk_size=0 must be >= 1"),
    ("model.mixer.d_key=-1", "model.mixer.d_key=-1 must be >= 1"),
    ("model.mixer.feature_map=relu", "allowed: elu1, identity, taylor"),
    ("model.mixer.feature_map=identity", "normalize=sum needs a positive feature map"),
    ("model.mixer.conv_size=-1", "model.mixer.conv_size=-1 must be >= 0"),
])
def test_bad_config_is_one_line_error(override, fragment):
    with pytest.raises(UserError) as info:
        resolve("smoke", ["model.mixer=linear_attention", override])
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_based_preset_builds_taylor_linear_attention_with_conv_and_a_window():
    from cfm_jax.config import resolve

    cfg = resolve("smoke", ["model.layers=based", "model.n_layers=2"])
    assert cfg.model.layers == ("based_linear", "sliding_window")
    based = [m for m in cfg.model.mixers if m.kind == "based_linear"] or [cfg.model.mixer]
    from cfm_jax.registry import default_config

    d = default_config("mixer", "based_linear")
    assert (d.feature_map, d.d_key, d.conv_size, d.normalize) == ("taylor", 16, 3, "sum")
    assert based
