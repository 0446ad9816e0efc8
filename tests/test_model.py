"""The language model: shapes, aux collection, token-by-token decoding equals the parallel forward."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cfm_jax.config import resolve
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
    e = efficiency(dense, {}, context_len=100)
    counts = param_counts(dense)
    assert e["params_active_per_token"] == counts["params_non_embedding"]
    assert e["weight_bytes"]["bf16"] == 2 * counts["params_total"]
    assert e["inference_memory_100_bytes"] == 4 * counts["params_total"] + sum(b.mixer.state_bytes(100) for b in dense.blocks)
    sparse = LanguageModel(resolve("smoke", ["model.d_model=32", "model.ffn=neuron_sparse"]).model, 20, rngs=nnx.Rngs(0))
    stats = {"ffn/activation_ratio/layer0": 0.5, "ffn/activation_ratio/layer1": 0.0}
    d, f = 32, 128  # relu: up (selector, always read) + down (read for active neurons only)
    expected = param_counts(sparse)["params_non_embedding"] - 2 * 2 * d * f + 2 * d * f + 0.5 * d * f
    assert efficiency(sparse, stats)["params_active_per_token"] == expected
