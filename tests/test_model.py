"""The language model: shapes, aux collection, token-by-token decoding equals the parallel forward."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cfm_jax.config import resolve
from cfm_jax.kernels import cblas
from cfm_jax.layers.common import Linear, RMSNorm
from cfm_jax.layers.model import LanguageModel, collect_aux, param_counts


def test_lm_decode_matches_forward():
    cfg = resolve("smoke", ["model.d_model=32", "model.mixer.n_kv_heads=2", "model.tie_embeddings=true"]).model
    model = LanguageModel(cfg, vocab_size=50, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 11), 0, 50)
    logits, aux = model(tokens)
    assert logits.shape == (2, 11, 50) and logits.dtype == jnp.float32
    state = model.init_state(2, 11)
    outs = []
    for t in range(11):
        lt, state = model.step(tokens[:, t], state)
        outs.append(lt)
    np.testing.assert_allclose(jnp.stack(outs, 1), logits, rtol=1e-4, atol=1e-4)


def test_param_counts():
    cfg = resolve("smoke", ["model.d_model=32", "model.n_layers=1", "model.ffn.activation=relu"]).model
    counts = param_counts(LanguageModel(cfg, vocab_size=10, rngs=nnx.Rngs(0)))
    attention = 4 * 32 * 32
    ffn = 2 * 32 * 128
    norms = 3 * 32
    assert counts["params_embedding"] == 2 * 10 * 32  # untied embedding + head
    assert counts["params_non_embedding"] == attention + ffn + norms
    assert counts["params_total"] == counts["params_embedding"] + counts["params_non_embedding"]


@pytest.mark.parametrize("mixer", ["attention", "mamba"])
def test_mixer_only_blocks(mixer):
    """model.use_ffn=false (Zoology's MQAR models): no FFN parameters, the accounting counts none, and
    token-by-token decoding still equals the forward."""
    from cfm_jax.layers.model import efficiency, forward_flops_per_token

    over = ["model.d_model=32", "model.n_layers=2", f"model.mixer={mixer}"]
    with_ffn, without = (LanguageModel(resolve("smoke", over + [f"model.use_ffn={u}"]).model, vocab_size=50, rngs=nnx.Rngs(0))
                         for u in ("true", "false"))
    ffn_params = sum(x.size for b in with_ffn.blocks for x in jax.tree.leaves(nnx.state(b.ffn, nnx.Param)))
    norm_params = 2 * 32  # one RMSNorm per block goes with its FFN
    assert param_counts(with_ffn)["params_total"] - param_counts(without)["params_total"] == ffn_params + norm_params
    assert forward_flops_per_token(with_ffn, 16) - forward_flops_per_token(without, 16) == sum(
        b.ffn.flops_per_token() for b in with_ffn.blocks)
    tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, 50)
    logits, aux = without(tokens)
    assert efficiency(without, aux["stats"], train_len=9)["ffn_params_active_per_token"] == 0
    state, outs = without.init_state(2, 9), []
    for t in range(9):
        lt, state = without.step(tokens[:, t], state)
        outs.append(lt)
    np.testing.assert_allclose(jnp.stack(outs, 1), logits, rtol=1e-4, atol=1e-4)


def test_collect_aux_sums_losses_and_averages_stats():
    per_layer = [
        {"ffn": {"loss": jnp.float32(1.0), "stats": {"ratio": jnp.float32(0.2)}}, "mixer": {"loss": jnp.float32(0.5), "stats": {}}},
        {"ffn": {"loss": jnp.float32(2.0), "stats": {"ratio": jnp.float32(0.4)}}, "mixer": {"loss": jnp.float32(0.0), "stats": {}}},
    ]
    aux = collect_aux(per_layer)
    assert float(aux["loss"]) == 3.5
    assert float(aux["stats"]["ffn/ratio/layer1"]) == np.float32(0.4)
    assert float(aux["stats"]["ffn/ratio"]) == np.float32(0.3)


def test_identity_neuron_hook_reproduces_the_forward():
    """Analysis tools compute FFNs as down(hook(hidden(x))): with an identity hook that must equal
    the ordinary forward for every FFN that exposes neurons."""
    for overrides in (["model.ffn=dense"], ["model.ffn=dense", "model.ffn.activation=relu"],
                      ["model.ffn=neuron_sparse", "model.ffn.activation=drelu", "model.ffn.top_k=8"]):
        cfg = resolve("smoke", ["model.d_model=32", *overrides]).model
        model = LanguageModel(cfg, vocab_size=20, rngs=nnx.Rngs(0))
        tokens = jax.random.randint(jax.random.key(0), (2, 9), 0, 20)
        seen = []
        hooked, _ = model(tokens, neuron_hook=lambda layer, ffn, a: seen.append(layer) or a)
        np.testing.assert_array_equal(hooked, model(tokens)[0])
        assert seen == [0, 1]


def test_efficiency_accounting_uses_measured_activity():
    from cfm_jax.layers.model import efficiency

    dense = LanguageModel(resolve("smoke", ["model.d_model=32"]).model, vocab_size=20, rngs=nnx.Rngs(0))
    e = efficiency(dense, {}, train_len=64, context_len=100)
    counts = param_counts(dense)
    assert e["params_active_per_token"] == counts["params_non_embedding"]
    assert e["ffn_flops_per_token"] == 2 * sum(b.ffn.active_params_per_token() for b in dense.blocks)
    assert e["mixer_flops_per_token"] == sum(b.mixer.flops_per_token(32) for b in dense.blocks)  # at train_len / 2
    assert e["flops_per_token"] == e["ffn_flops_per_token"] + e["mixer_flops_per_token"] + 2 * 32 * 20
    assert e["weight_bytes"]["bf16"] == 2 * counts["params_total"]
    assert e["inference_memory_100_bytes"] == 4 * counts["params_total"] + sum(b.mixer.state_bytes(100) for b in dense.blocks)
    sparse = LanguageModel(resolve("smoke", ["model.d_model=32", "model.ffn=neuron_sparse"]).model, 20, rngs=nnx.Rngs(0))
    stats = {"ffn/activation_ratio/layer0": 0.5, "ffn/activation_ratio/layer1": 0.0}
    d, f = 32, 128  # relu: up (selector, always read) + down (read for active neurons only)
    expected = param_counts(sparse)["params_non_embedding"] - 2 * 2 * d * f + 2 * d * f + 0.5 * d * f
    e = efficiency(sparse, stats, train_len=64)
    assert e["params_active_per_token"] == expected and e["ffn_flops_per_token"] == 2 * (2 * d * f + 0.5 * d * f)


def test_gated_neuron_ffn_counts_up_rows_by_its_gate():
    """dReLU on a constructed input: gates open for neurons 0 and 1, relu(up) for 0 and 2, so only
    neuron 0 has a nonzero activation (ratio 1/4) but a sparse kernel reads the up rows of 0 and 1
    (gate ratio 1/2): active weights = gate in full + 1/2 of up + 1/4 of down."""
    from cfm_jax.layers.model import ffn_active_params
    from cfm_jax.layers.neuron_sparse import NeuronSparseConfig, NeuronSparseFFN
    from cfm_jax.registry import LayerContext

    ffn = NeuronSparseFFN(NeuronSparseConfig(activation="drelu", d_ff=4), LayerContext(2, 1, 0, 0.1), rngs=nnx.Rngs(0))
    ffn.gate.kernel.value = jnp.array([[1.0, 1.0, -1.0, -1.0], [0.0, 0.0, 0.0, 0.0]])
    ffn.up.kernel.value = jnp.array([[1.0, -1.0, 1.0, -1.0], [0.0, 0.0, 0.0, 0.0]])
    _, aux = ffn(jnp.array([[[1.0, 0.0]]]))
    stats = {k: float(v) for k, v in aux["stats"].items()}
    assert stats["activation_ratio"] == 0.25 and stats["gate_ratio"] == 0.5
    assert ffn_active_params(ffn, stats) == 2 * 4 + 0.5 * 2 * 4 + 0.25 * 2 * 4 == 14
    relu = NeuronSparseFFN(NeuronSparseConfig(activation="relu", d_ff=4), LayerContext(2, 1, 0, 0.1), rngs=nnx.Rngs(0))
    assert ffn_active_params(relu, {"activation_ratio": 0.25}) == 8 + 2  # up in full + 1 of 4 down rows
    assert ffn_active_params(relu, {"active_params_per_token": 7.0}) == 7.0  # a measured count (MoE) wins


@pytest.mark.parametrize("shape", [(1, 7, 16), (3, 5, 16), (2, 3, 4, 16), (16,)])
def test_flattening_linear_and_rmsnorm_match_flax(shape):
    """The 2-D-view Linear and RMSNorm (a CPU speed fix) compute what nnx.Linear / nnx.RMSNorm do:
    same parameters, same outputs and input gradients on random inputs of any rank. With XLA's dot,
    as flax uses: MKL's products (rounded differently) are checked in test_cblas.py."""
    with cblas.forced("xla"):
        _check_flattening_matches_flax(shape)


def _check_flattening_matches_flax(shape):
    x = jax.random.normal(jax.random.key(0), shape)
    pairs = [(Linear(16, 8, rngs=nnx.Rngs(1)), nnx.Linear(16, 8, rngs=nnx.Rngs(1))),
             (RMSNorm(16, rngs=nnx.Rngs(1)), nnx.RMSNorm(16, rngs=nnx.Rngs(1)))]
    for ours, flax_module in pairs:
        # A non-trivial RMSNorm scale, so its gradient path is exercised too.
        for m in (ours, flax_module):
            for path, p in nnx.iter_graph(m):
                if isinstance(p, nnx.Param):
                    p[...] = p[...] + 0.1 * jnp.arange(p.size, dtype=p.dtype).reshape(p.shape)
        assert jax.tree.structure(nnx.state(ours)) == jax.tree.structure(nnx.state(flax_module))
        np.testing.assert_allclose(ours(x), flax_module(x), rtol=1e-5, atol=1e-6)
        g_ours = jax.grad(lambda x: jnp.sum(jnp.sin(ours(x))))(x)
        g_flax = jax.grad(lambda x: jnp.sum(jnp.sin(flax_module(x))))(x)
        np.testing.assert_allclose(g_ours, g_flax, rtol=1e-5, atol=1e-6)
