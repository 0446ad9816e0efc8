"""The generic contract: every registered ffn and mixer kind, with its default config, must pass these.

A new variant registered with `@register` is picked up here with no new test code.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from cfm_jax import registry
from cfm_jax.config import ModelConfig, TrainConfig
from cfm_jax.layers.model import LanguageModel
from cfm_jax.registry import LayerContext
from cfm_jax.train import make_optimizer, make_train_step

D_MODEL, BATCH, SEQ = 32, 2, 13
CTX = LayerContext(d_model=D_MODEL, n_layers=2, layer=0, init_std=0.1)
ALL_KINDS = [(slot, kind) for slot in registry.SLOTS for kind in registry.kinds(slot)]
MIXERS = registry.kinds("mixer")


def build(slot: str, kind: str, seed: int = 0):
    cfg = registry.default_config(slot, kind)
    cfg.validate(D_MODEL)
    return registry.build(cfg, CTX, nnx.Rngs(seed))


def inputs(seed: int = 1) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (BATCH, SEQ, D_MODEL))


@pytest.mark.parametrize("slot,kind", ALL_KINDS)
def test_shape_and_aux(slot, kind):
    y, aux = build(slot, kind)(inputs())
    assert y.shape == (BATCH, SEQ, D_MODEL)
    assert aux["loss"].shape == () and jnp.isfinite(aux["loss"])
    for name, value in aux["stats"].items():
        assert jnp.shape(value) == (), f"stat {name} must be a scalar"


@pytest.mark.parametrize("slot,kind", ALL_KINDS)
def test_causal(slot, kind):
    """Changing the input at t+1 leaves every output at positions <= t unchanged."""
    module, x = build(slot, kind), inputs()
    t = SEQ // 2
    x2 = x.at[:, t + 1:].set(jax.random.normal(jax.random.key(9), x[:, t + 1:].shape))
    y1, _ = module(x)
    y2, _ = module(x2)
    np.testing.assert_allclose(y1[:, : t + 1], y2[:, : t + 1], rtol=1e-5, atol=1e-6)
    assert not np.allclose(y1[:, t + 1:], y2[:, t + 1:]), "output must depend on the changed tokens"


@pytest.mark.parametrize("slot,kind", ALL_KINDS)
def test_finite_gradients(slot, kind):
    module = build(slot, kind)
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)

    def loss(params):
        y, aux = nnx.merge(graphdef, params, rest)(inputs())
        return jnp.mean(y**2) + aux["loss"]

    grads = jax.grad(loss)(params)
    leaves = jax.tree.leaves(grads)
    assert leaves and all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert any(float(jnp.abs(g).max()) > 0 for g in leaves), "no parameter receives gradient"


@pytest.mark.parametrize("kind", MIXERS)
def test_mixer_decode_parity(kind):
    """Token-by-token `step` from `init_state` equals the parallel forward."""
    module, x = build("mixer", kind), inputs()
    y, _ = module(x)
    state = module.init_state(BATCH, SEQ)
    step = nnx.jit(lambda m, xt, s: m.step(xt, s))
    outs = []
    for t in range(SEQ):
        yt, state = step(module, x[:, t], state)
        outs.append(yt)
    np.testing.assert_allclose(jnp.stack(outs, axis=1), y, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", MIXERS)
def test_donated_decode_step_updates_its_cache_in_place(kind):
    """The compiled decode step (state donated, as generation and the bench run it) holds no copy of a
    state buffer that spans the context: a KV cache is written in place, not copied every token."""
    module, max_len = build("mixer", kind), 96
    graphdef, params = nnx.split(module)
    step = jax.jit(lambda p, xt, s: nnx.merge(graphdef, p).step(xt, s), donate_argnums=2)
    state = module.init_state(BATCH, max_len)
    hlo = step.lower(params, inputs()[:, 0], state).compile().as_text()
    spans = {"[" + ",".join(map(str, x.shape)) + "]" for x in jax.tree.leaves(state) if max_len in x.shape}
    copies = [line.strip() for line in hlo.splitlines() if " copy(" in line and any(s in line for s in spans)]
    assert not copies, copies[0][:200]


@pytest.mark.parametrize("slot,kind", ALL_KINDS)
def test_kind_satisfies_its_slot_protocol(slot, kind):
    """Every kind provides its slot's contract (cfm_jax/layers/contracts.py)."""
    from cfm_jax.layers import contracts

    module = build(slot, kind)
    assert isinstance(module, contracts.Mixer if slot == "mixer" else contracts.FFN), \
        f"{kind} lacks part of the {slot} contract (see cfm_jax/layers/contracts.py)"


@pytest.mark.parametrize("kind", MIXERS)
def test_mixer_accounting(kind):
    module = build("mixer", kind)
    small, large = module.state_bytes(16), module.state_bytes(1024)
    assert 0 < small <= large
    assert module.flops_per_token(16) > 0


@pytest.mark.parametrize("kind", registry.kinds("ffn"))
def test_ffn_accounting(kind):
    module = build("ffn", kind)
    assert module.flops_per_token() > 0
    assert 0 < module.active_params_per_token() <= sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


@pytest.mark.parametrize("kind", registry.kinds("ffn"))
def test_ffn_accounting_follows_its_reported_activation_ratio(kind):
    """An FFN that reports an activation ratio is counted at that ratio (the model's accounting rule,
    ffn_active_params): fewer active neurons, fewer active weights. Exempt: FFNs that report their own
    active_params_per_token statistic (MoE) and dense FFNs that declare `counts_dense`."""
    from cfm_jax.layers.model import ffn_active_params

    module = build("ffn", kind)
    _, aux = module(inputs())
    stats = aux["stats"]
    if "activation_ratio" not in stats or "active_params_per_token" in stats or getattr(module, "counts_dense", False):
        pytest.skip("reports no activation ratio, or counts itself")
    sparse, dense = (ffn_active_params(module, {"activation_ratio": r, "gate_ratio": r}) for r in (0.1, 0.9))
    assert sparse < dense, (f"{kind} reports activation_ratio but active_params_per_token ignores it: give it an "
                            "activation_ratio argument (README, Add a new variant) or declare counts_dense = True")


@pytest.mark.parametrize("slot,kind", ALL_KINDS)
def test_trains_one_step(slot, kind):
    """A tiny LM with this kind in its slot takes a finite optimizer step that changes parameters."""
    cfg = ModelConfig(d_model=D_MODEL, n_layers=2, **{slot: registry.default_config(slot, kind)})
    cfg.validate()
    model = LanguageModel(cfg, vocab_size=17, rngs=nnx.Rngs(0))
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx, _ = make_optimizer(TrainConfig(steps=10, warmup_steps=0, lr=1e-2))
    step = make_train_step(graphdef, tx)
    tokens = jax.random.randint(jax.random.key(0), (BATCH, SEQ + 1), 0, 17)
    batch = {"inputs": tokens[:, :-1], "labels": tokens[:, 1:]}
    new_params, _, _, metrics = step(params, rest, tx.init(params), batch, 0)
    assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), params, new_params)
    assert all(jax.tree.leaves(changed)), "every parameter should move after one AdamW step"
