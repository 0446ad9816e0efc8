"""MoE FFN: dispatch paths vs the per-expert loop (outputs and gradients), capacity semantics,
routing (top-k weights, top-p selection), balancing (aux loss, loss-free bias), statistics, bad input.
Expert parallelism: tests/test_moe_expert_parallel.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from baselines import moe_dispatch as D
from baselines import moe_routing as R
from baselines.moe import MoE, MoEConfig
from cfm_jax.cli import main
from cfm_jax.kernels import cblas
from cfm_jax.config import ModelConfig, TrainConfig
from cfm_jax.errors import UserError
from cfm_jax.layers.model import LanguageModel
from cfm_jax.registry import LayerContext
from cfm_jax.train import make_optimizer, make_train_step

N, D_MODEL, E, F = 26, 8, 4, 6  # 26 tokens = 2 sequences of 13
CTX = LayerContext(d_model=16, n_layers=2, layer=0, init_std=0.1)
# Jitted: one compile instead of op-by-op dispatch. Modules share shapes (E 4, width 8) so their
# eager initializers compile once.
call = nnx.jit(lambda module, x: module(x))
route = jax.jit(R.route, static_argnames=("score", "mode", "k", "top_p", "renormalize"))


def random_problem(mode: str, k: int, seed: int = 0, n: int = N, logit_bias=0.0, act: str = "swiglu"):
    keys = jax.random.split(jax.random.key(seed), 5)
    x = jax.random.normal(keys[0], (n, D_MODEL))
    logits = 2.0 * jax.random.normal(keys[1], (n, E)) + logit_bias
    shapes = [(E, D_MODEL, F if act != "relu" else 0), (E, D_MODEL, F), (E, F, D_MODEL)]
    w = D.Experts(*(0.3 * jax.random.normal(kk, s) for kk, s in zip(keys[2:], shapes)), act)
    r = route(logits, None, score="softmax", mode=mode, k=k, top_p=0.6, renormalize=True)
    return x, r, w


# (routing mode, slots, dispatch, groups (G, T), capacity): every fast path, with drops and padding.
CASES = [
    ("topk", 2, "dropless", None, None),
    ("topp", 3, "dropless", None, None),
    ("topk", 1, "capacity", (2, 13), 3),  # per-sequence groups, drops
    ("topk", 2, "capacity", (6, 5), 2),  # fixed groups of 5, the last padded, drops
    ("topp", 3, "capacity", (2, 13), 4),
]


def with_grads(f):
    """One compile per implementation: (loss, (y, kept)) and the gradients of sum(sin(y)) wrt
    (x, weights, experts)."""
    def loss(*args):
        y, kept = f(*args)
        return jnp.sum(jnp.sin(y)), (y, kept)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


def matmul_mode(matmul):
    """cblas.forced(matmul), or a skip where MKL cannot run. Dropless dispatch is `grouped_dispatch`
    under mkl and fixed-size blocks under xla (forced: problems this small stay in XLA under auto)."""
    if matmul == "mkl" and (why := cblas.mkl_unavailable(jnp.ones((8, 8)))):
        pytest.skip(f"MKL matmuls cannot run here: {why}")
    return cblas.forced(matmul)


@pytest.mark.parametrize("matmul", ["xla", "mkl"])
@pytest.mark.parametrize("mode,k,path,groups,cap", CASES)
def test_dispatch_matches_loop_reference(mode, k, path, groups, cap, matmul):
    if path == "capacity" and matmul == "mkl":
        pytest.skip("capacity dispatch has no MKL-specific path")
    with matmul_mode(matmul):
        _check_dispatch(mode, k, path, groups, cap)


@pytest.mark.parametrize("matmul", ["xla", "mkl"])
@pytest.mark.parametrize("act", ["reglu", "relu"])
@pytest.mark.parametrize("case", [CASES[0], CASES[3]])
def test_expert_activations_match_loop_reference(case, act, matmul):
    """ReGLU and ReLU (zero-width gate) experts through the dropless and capacity paths."""
    if case[2] == "capacity" and matmul == "mkl":
        pytest.skip("capacity dispatch has no MKL-specific path")
    with matmul_mode(matmul):
        _check_dispatch(*case, act=act)


def _check_dispatch(mode, k, path, groups, cap, act="swiglu"):
    x, r, w = random_problem(mode, k, act=act)
    keep = jax.jit(D.reference_keep, static_argnums=(2, 3, 4))(r.experts, r.valid, E, groups, cap) if cap else r.valid
    if path == "dropless":
        run = lambda x, wt, w: D.dropless_dispatch(x, r.experts, wt, r.valid, w)
    else:
        run = lambda x, wt, w: D.capacity_dispatch(x, r.experts, wt, r.valid, w, groups=groups, cap=cap)
    reference = lambda x, wt, w: (D.moe_reference(x, r.experts, wt, keep, w), keep)
    (_, (y, kept)), g_fast = with_grads(run)(x, r.weights, w)
    (_, (y_ref, _)), g_ref = with_grads(reference)(x, r.weights, w)
    np.testing.assert_array_equal(kept, keep)
    if cap:
        assert not bool(jnp.all(kept == r.valid)), "the case should drop something"
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_capacity_priority_and_drops():
    """4 tokens, 2 experts, capacity 2: top-1 choices claim slots before any top-2 choice."""
    experts = jnp.array([[0, 1], [0, 1], [0, 1], [1, 0]])
    valid = jnp.ones((4, 2), bool)
    weights = jnp.full((4, 2), 0.5)
    w = D.Experts(jnp.ones((2, 3, 2)), jnp.ones((2, 3, 2)), jnp.ones((2, 2, 3)))
    x = jnp.arange(12.0).reshape(4, 3) / 10
    _, kept = jax.jit(D.capacity_dispatch, static_argnames=("groups", "cap"))(
        x, experts, weights, valid, w, groups=(1, 4), cap=2)
    # expert 0: top-1 of tokens 0, 1 (token 2's top-1 is third: dropped); expert 1: token 3's top-1
    # first, then token 0's top-2; tokens 1 and 2's top-2 find it full; token 3's top-2 (expert 0) too.
    expected = [[True, True], [True, False], [False, False], [True, False]]
    np.testing.assert_array_equal(kept, expected)
    np.testing.assert_array_equal(D.reference_keep(experts, valid, 2, (1, 4), 2), expected)
    r = R.Routing(experts, weights, valid, jnp.full((4, 2), 0.5))
    stats = jax.jit(lambda r, kept: R.routing_stats(r, kept, R.expert_load(r, 2), seq=4, n_shared=0,
                                                    params_per_expert=1, router_params=1))(r, kept)
    assert float(stats["dropped_fraction"]) == pytest.approx(4 / 8)
    assert float(stats["experts_per_token_p50"]) == 1 and float(stats["experts_per_token_max"]) == 2
    assert float(stats["activation_ratio"]) == pytest.approx(4 / 8)  # 4 of 8 (token, expert) pairs
    assert float(stats["union_ratio_8"]) == float(stats["union_ratio_batch"]) == 1.0  # both experts used


def test_capacity_factor_e_over_k_is_dropless():
    for t, k, e in [(13, 2, 4), (5, 1, 8), (128, 2, 8), (7, 3, 6)]:
        assert D.capacity(t, k, e, e / k) == t
    x, r, w = random_problem("topk", 2)
    cap = D.capacity(13, 2, E, E / 2)
    y, kept = jax.jit(lambda *a: D.capacity_dispatch(*a, groups=(2, 13), cap=cap))(x, r.experts, r.weights, r.valid, w)
    assert bool(jnp.all(kept))
    y_dropless, _ = jax.jit(D.dropless_dispatch)(x, r.experts, r.weights, r.valid, w)
    np.testing.assert_allclose(y, y_dropless, rtol=1e-5, atol=1e-6)


def test_topk_weights_renormalized_or_not():
    logits = jnp.log(jnp.array([[0.1, 0.5, 0.3, 0.1]]))
    mixtral = route(logits, None, score="softmax", mode="topk", k=2, top_p=1.0, renormalize=True)
    switch = route(logits, None, score="softmax", mode="topk", k=2, top_p=1.0, renormalize=False)
    np.testing.assert_array_equal(mixtral.experts, [[1, 2]])
    np.testing.assert_allclose(mixtral.weights, [[0.5 / 0.8, 0.3 / 0.8]], rtol=1e-6)
    np.testing.assert_allclose(mixtral.weights, jax.nn.softmax(logits[:, 1:3]), rtol=1e-6)
    np.testing.assert_allclose(switch.weights, [[0.5, 0.3]], rtol=1e-6)
    sig = route(jnp.array([[0.0, 2.0, -1.0]]), None, score="sigmoid", mode="topk", k=1, top_p=1.0, renormalize=False)
    np.testing.assert_allclose(sig.weights, [[jax.nn.sigmoid(2.0)]], rtol=1e-6)


@pytest.mark.parametrize("p,max_k,expected", [
    (0.4, 4, [1]), (0.6, 4, [1, 2]), (0.85, 4, [1, 2, 0]), (0.85, 2, [1, 2]), (1.0, 4, [1, 2, 0, 3]),
])
def test_topp_picks_expected_experts(p, max_k, expected):
    probs = jnp.array([[0.15, 0.5, 0.3, 0.05]])  # order 1, 2, 0, 3; cumulative 0.5, 0.8, 0.95, 1
    r = route(jnp.log(probs), None, score="softmax", mode="topp", k=max_k, top_p=p, renormalize=True)
    chosen = [int(e) for e, v in zip(r.experts[0], r.valid[0]) if v]
    assert chosen == expected
    mass = probs[0, jnp.array(expected)]
    np.testing.assert_allclose(r.weights[0][: len(expected)], mass / mass.sum(), rtol=1e-5)
    assert float(jnp.sum(r.weights[0][len(expected):])) == 0.0


def test_aux_loss_is_one_under_uniform_routing():
    # Every token's probabilities are a cyclic shift of one vector: mean P and load both uniform.
    base = jnp.log(jnp.array([0.4, 0.3, 0.2, 0.1]))
    logits = jnp.stack([jnp.roll(base, i) for i in range(8)])
    r = route(logits, None, score="softmax", mode="topk", k=2, top_p=1.0, renormalize=True)
    load = R.expert_load(r, 4)
    np.testing.assert_allclose(load, [4, 4, 4, 4])
    assert float(R.switch_aux_loss(load, r.probs)) == pytest.approx(1.0, abs=1e-6)
    skewed = route(jnp.tile(jnp.array([[9.0, 0, 0, 0]]), (8, 1)), None, score="softmax", mode="topk",
                     k=1, top_p=1.0, renormalize=True)
    assert float(R.switch_aux_loss(R.expert_load(skewed, 4), skewed.probs)) > 3.9  # ~E when collapsed


def test_bias_update_sign_and_size():
    new = R.bias_update(jnp.array([0.0, 0.1, 0.0, 0.0]), jnp.array([3.0, 1.0, 2.0, 2.0]), 1e-3)
    np.testing.assert_allclose(new, [-1e-3, 0.1 + 1e-3, 0.0, 0.0], rtol=1e-6)


def test_bias_steers_selection_not_weights():
    logits = jnp.log(jnp.array([[0.6, 0.3, 0.1]]))
    r = route(logits, jnp.array([0.0, 0.0, 1.0]), score="softmax", mode="topk", k=1, top_p=1.0, renormalize=False)
    assert int(r.experts[0, 0]) == 2 and float(r.weights[0, 0]) == pytest.approx(0.1, rel=1e-5)


def test_module_stats_and_accounting():
    cfg = MoEConfig(n_experts=4, d_expert=8, top_k=2, n_shared=1, bias_update_rate=0.05)
    module = MoE(cfg, CTX, rngs=nnx.Rngs(0))
    _, aux = call(module, jax.random.normal(jax.random.key(1), (2, 7, 16)))
    np.testing.assert_array_equal(module.bias[...], 0.0)  # constructed for inference: never updated
    s = {k: float(v) for k, v in aux["stats"].items()}
    assert s["bias_range"] == 0
    assert s["activation_ratio"] == pytest.approx(3 / 5)  # (k + shared) / (E + shared)
    assert s["experts_per_token_mean"] == s["experts_per_token_p50"] == s["experts_per_token_p90"] == 2
    assert s["dropped_fraction"] == 0 and 0 < s["router_entropy"] <= 1
    assert sum(s[f"load_e{e}"] for e in range(4)) == pytest.approx(1.0)
    assert s["load_cv"] >= 0 and s["load_maxvio"] >= 0
    assert float(aux["loss"]) == pytest.approx(0.01 * s["aux_loss"] + 1e-3 * s["z_loss"], rel=1e-5)
    per_expert = 3 * 16 * 8
    assert module.param_count() == 16 * 4 + 5 * per_expert
    assert module.param_count() == sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))
    assert module.active_params_per_token() == 16 * 4 + 3 * per_expert == s["active_params_per_token"]
    assert module.flops_per_token() == 2 * module.active_params_per_token()


@pytest.mark.parametrize("act,matrices", [("reglu", 3), ("relu", 2)])
def test_expert_activation_module_accounting_and_default_width(act, matrices):
    """ReLU experts have no gate matrix (2 matrices, dense default width 4d split over k); ReGLU keeps
    three (8d/3). Counts equal the parameters that exist; the module equals the loop reference."""
    cfg = MoEConfig(n_experts=4, top_k=2, n_shared=1, expert_activation=act)
    module = MoE(cfg, CTX, rngs=nnx.Rngs(0))
    f = cfg.width(16)
    assert f == (-(-(4 * 16) // 3 // 8) * 8 if act == "relu" else -(-48 // 3 // 8) * 8)
    assert module.params_per_expert() == matrices * 16 * f
    assert module.param_count() == sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))
    x = jax.random.normal(jax.random.key(1), (2, 7, 16))
    y, _ = call(module, x)
    tokens = x.reshape(14, 16)
    r, _ = module.route(tokens)
    up = module.shared_up(tokens)
    shared = jax.nn.relu(module.shared_gate(tokens)) * up if act == "reglu" else jax.nn.relu(up)
    want = D.moe_reference(tokens, r.experts, r.weights, r.valid, module.experts()) + module.shared_down(shared)
    np.testing.assert_allclose(y.reshape(14, 16), want, rtol=1e-5, atol=1e-6)


def test_module_dispatch_paths_agree_with_loop():
    """The module end to end (router, shared expert, each dispatch) against the reference loop."""
    x = jax.random.normal(jax.random.key(1), (2, 7, 16))
    for cfg in [MoEConfig(n_experts=4, d_expert=8, n_shared=1, routing="topp", top_p=0.5, max_k=3),
                MoEConfig(n_experts=4, d_expert=8, score="sigmoid", dispatch="capacity", capacity_factor=0.75,
                          group_size=4)]:
        module = MoE(cfg, CTX, rngs=nnx.Rngs(0))
        y, aux = call(module, x)
        groups = D.group_shape(2, 7, cfg.group_size)
        cap = D.capacity(groups[1], cfg.slots(), 4, cfg.capacity_factor) if cfg.dispatch == "capacity" else None

        @nnx.jit
        def reference(m, x):
            tokens = x.reshape(14, 16)
            r, _ = m.route(tokens)
            keep = D.reference_keep(r.experts, r.valid, 4, groups, cap)
            y = D.moe_reference(tokens, r.experts, r.weights, keep, m.experts())
            if cfg.n_shared:
                y = y + m.shared_down(jax.nn.silu(m.shared_gate(tokens)) * m.shared_up(tokens))
            return y

        np.testing.assert_allclose(y.reshape(14, 16), reference(module, x), rtol=1e-5, atol=1e-6)
        assert (float(aux["stats"]["dropped_fraction"]) > 0) == (cfg.dispatch == "capacity")


def test_expert_forward_matches_dropless_and_masks_experts():
    """The bricks analysis path (every expert computed, weights hooked) equals the dropless layer with
    an identity hook, and zeroing an expert's weight removes exactly its contribution."""
    x = jax.random.normal(jax.random.key(2), (2, 5, 16))
    cfg = MoEConfig(n_experts=4, d_expert=8, top_k=2, n_shared=1)
    module = MoE(cfg, CTX, rngs=nnx.Rngs(0))
    y, _ = call(module, x)
    np.testing.assert_allclose(module.expert_forward(x, lambda w: w), y, rtol=1e-5, atol=1e-6)
    w = []
    module.expert_forward(x, lambda a: w.append(a) or a)
    assert w[0].shape == (2, 5, 4) and np.all(np.sum(np.asarray(w[0]) > 0, axis=-1) == 2)  # top-2 per token
    keep = jnp.asarray([1.0, 0.0, 1.0, 1.0])
    tokens = x.reshape(10, 16)
    r, _ = module.route(tokens)
    expected = D.moe_reference(tokens, r.experts, r.weights * (r.experts != 1), r.valid, module.experts())
    expected = expected + module.shared_down(jax.nn.silu(module.shared_gate(tokens)) * module.shared_up(tokens))
    np.testing.assert_allclose(module.expert_forward(x, lambda a: a * keep).reshape(10, 16), expected,
                               rtol=1e-5, atol=1e-6)


def test_capacity_dispatch_is_not_causal():
    """Documented: with capacity, a later token can take an earlier token's slot."""
    cfg = MoEConfig(n_experts=4, d_expert=8, dispatch="capacity", capacity_factor=0.5)
    module = MoE(cfg, CTX, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (1, 16, 16))
    y1, _ = call(module, x)
    changed = False
    for seed in range(5):
        x2 = x.at[:, 8:].set(jax.random.normal(jax.random.key(10 + seed), (1, 8, 16)))
        changed |= not np.allclose(call(module, x2)[0][:, :8], y1[:, :8])
    assert changed


def test_training_step_updates_bias_and_everything_trains():
    """One trainer step with top-p, shared experts, jitter and loss-free balancing: every parameter
    moves and the carried bias is b + u * sign(mean(load) - load) for the step's load."""
    u = 1e-3
    ffn = MoEConfig(n_experts=4, d_expert=8, routing="topp", max_k=2, n_shared=1, jitter=0.01, bias_update_rate=u)
    cfg = ModelConfig(d_model=16, n_layers=1, ffn=ffn)
    cfg.validate()
    model = LanguageModel(cfg, vocab_size=11, rngs=nnx.Rngs(0))
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx, _ = make_optimizer(TrainConfig(steps=10, warmup_steps=0, lr=1e-2))
    tokens = jax.random.randint(jax.random.key(0), (2, 9), 0, 11)
    batch = {"inputs": tokens[:, :-1], "labels": tokens[:, 1:]}
    new_params, new_rest, _, metrics = make_train_step(graphdef, tx)(params, rest, tx.init(params), batch, 3)
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.any(a != b)), params, new_params)))
    bias = np.asarray(new_rest["blocks"][0]["ffn"]["bias"][...])
    share = np.array([float(metrics[f"ffn/load_e{e}"]) for e in range(4)])  # load / total load
    below = 0.25 - share  # the sign of mean(load) - load; |.| < 1e-6 is a tie (no change)
    np.testing.assert_allclose(bias, np.where(np.abs(below) > 1e-6, u * np.sign(below), 0.0), atol=1e-9)
    assert np.any(bias != 0)
    for name in ("aux_loss", "z_loss", "load_cv", "router_entropy", "experts_per_token_p90", "bias_range"):
        assert np.isfinite(float(metrics[f"ffn/{name}"]))


@pytest.mark.parametrize("override,fragment", [
    ("model.ffn.top_k=9", "model.ffn.top_k=9 must be in [1, n_experts=8]"),
    ("model.ffn.top_p=0", "model.ffn.top_p=0.0 must be in (0, 1]"),
    ("model.ffn.top_p=1.5", "model.ffn.top_p=1.5 must be in (0, 1]"),
    ("model.ffn.capacity_factor=0", "model.ffn.capacity_factor=0.0 must be > 0"),
    ("model.ffn.max_k=0", "model.ffn.max_k=0 must be in [1, n_experts=8]"),
    ("model.ffn.n_experts=1", "model.ffn.n_experts=1 must be >= 2"),
    ("model.ffn.dispatch=ragged", "allowed: dropless, capacity"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, override, fragment):
    code = main(["train", "--workdir", str(tmp_path / "w"), "--scale", "smoke", "model.ffn=moe", override])
    err = capsys.readouterr().err
    assert code == 2 and fragment in err and err.count("\n") == 1 and err.startswith("error: ")
    assert not (tmp_path / "w").exists()


def test_validate_raises_user_error():
    with pytest.raises(UserError, match="group_size"):
        MoEConfig(group_size=-1).validate(16)


@pytest.mark.parametrize("matmul", ["xla", "mkl"])
def test_blocked_ffn_matches_gathered_weights_reference(matmul):
    """The per-expert loop kernel (hand-written backward) equals gathering each block's expert
    weights: outputs and gradients wrt blocks and weights, with an expert owning no block and
    trailing blocks owned by none (those come out zero, and get zero gradient). Its block products
    in XLA and in MKL (cfm_jax.kernels.cblas.product; forced: blocks this small stay in XLA under auto)."""
    if matmul == "mkl" and (why := cblas.mkl_unavailable(jnp.ones((8, 8)))):
        pytest.skip(f"MKL matmuls cannot run here: {why}")
    with cblas.forced(matmul):
        _check_blocked_ffn()


@pytest.mark.parametrize("act", ["reglu", "relu"])
def test_blocked_ffn_other_activations_match_reference_float64(act):
    """The hand-written backward for ReGLU and ReLU experts, in float64 (XLA products), where the
    only difference from the gathered-weights reference is summation order."""
    n_blocks, b, d, f = 7, 4, 6, 5
    first, count = jnp.array([0, 2, 2, 5]), jnp.array([2, 0, 3, 1])
    block_expert = jnp.array([0, 0, 2, 2, 2, 3, 3])
    owned = (jnp.arange(n_blocks) < 6)[:, None, None]
    with jax.enable_x64(True), cblas.forced("xla"):
        ks = jax.random.split(jax.random.key(3), 5)
        xb = jax.random.normal(ks[0], (n_blocks, b, d), jnp.float64)
        shapes = [(4, d, f if act == "reglu" else 0), (4, d, f), (4, f, d)]
        w = D.Experts(*(jax.random.normal(key, shape, jnp.float64) for key, shape in zip(ks[1:4], shapes)), act)
        probe = jax.random.normal(ks[4], (n_blocks, b, d), jnp.float64)
        grads = lambda fn: jax.grad(lambda xb, w: jnp.sum(jnp.sin(fn(xb, w)) * probe), argnums=(0, 1))(xb, w)
        g_fast = grads(lambda xb, w: D.blocked_ffn(xb, first, count, w))
        g_ref = grads(lambda xb, w: D.blocked_ffn_reference(xb, block_expert, w) * owned)
        np.testing.assert_allclose(D.blocked_ffn(xb, first, count, w),
                                   D.blocked_ffn_reference(xb, block_expert, w) * owned, rtol=1e-12, atol=1e-12)
        leaves = jax.tree.leaves(g_fast)
        assert len(leaves) == 4 and leaves[1].shape == shapes[0]
        for a, b_ in zip(leaves, jax.tree.leaves(g_ref)):
            np.testing.assert_allclose(a, b_, rtol=1e-10, atol=1e-12)


def _check_blocked_ffn():
    n_blocks, b, d, f = 7, 4, 6, 5
    first, count = jnp.array([0, 2, 2, 5]), jnp.array([2, 0, 3, 1])  # expert 1 empty; block 6 unowned
    block_expert = jnp.array([0, 0, 2, 2, 2, 3, 3])
    ks = jax.random.split(jax.random.key(3), 5)
    xb = jax.random.normal(ks[0], (n_blocks, b, d))
    w = D.Experts(*(jax.random.normal(key, shape) for key, shape in zip(ks[1:4], [(4, d, f), (4, d, f), (4, f, d)])))
    owned = (jnp.arange(n_blocks) < 6)[:, None, None]
    probe = jax.random.normal(ks[4], (n_blocks, b, d))

    def loss(fn):
        return jax.jit(jax.value_and_grad(lambda xb, w: jnp.sum(jnp.sin(fn(xb, w)) * probe), argnums=(0, 1)))

    (l_fast, g_fast) = loss(lambda xb, w: D.blocked_ffn(xb, first, count, w))(xb, w)
    np.testing.assert_allclose(D.blocked_ffn(xb, first, count, w)[6], 0.0)
    # Against the float64 reference, within the float32 rounding bound of this computation
    # (first-order error analysis with the operands' magnitudes, see _blocked_ffn_rounding_bound):
    # MKL sums in other orders than XLA, differently on other CPUs, but never beyond that bound.
    with jax.enable_x64(True):
        f64 = lambda t: jax.tree.map(lambda a: jnp.asarray(np.asarray(a), jnp.float64), t)
        ref_loss = lambda xb, w: jnp.sum(jnp.sin(D.blocked_ffn_reference(xb, block_expert, w) * owned) * f64(probe))
        l_ref, g_ref = jax.value_and_grad(ref_loss, argnums=(0, 1))(f64(xb), f64(w))
        g_ref = [np.asarray(g) for g in jax.tree.leaves(g_ref)]
    bounds = _blocked_ffn_rounding_bound(*(np.asarray(a, np.float64) for a in (xb, w.gate, w.up, w.down, probe * owned)), np.asarray(block_expert))
    assert abs(float(l_fast) - float(l_ref)) <= 1e-5 * np.abs(np.asarray(probe)).sum()
    for got, want, bound in zip(jax.tree.leaves(g_fast), g_ref, bounds):
        err = np.abs(np.asarray(got, np.float64) - want)
        assert np.all(err <= bound), f"max error {err.max():.3g}, over the bound by up to {(err / np.maximum(bound, 1e-300)).max():.3g}x"


def _blocked_ffn_rounding_bound(x, wg, wu, wd, p, block_expert):
    """Elementwise first-order bound on the float32 rounding error of the gradients of
    sum(sin(y) p), y = (silu(x Wg) * (x Wu)) Wd per block with its expert's weights, over any order
    of summation: each length-k sum of products contributes gamma_k times the sum of |terms|, each
    elementwise op u times |result|, propagated through the derivatives' magnitudes. Returns bounds
    in jax.tree.leaves order of (d x, Experts(d gate, d up, d down)), doubled for second-order terms."""
    u = 2.0**-24
    gamma = lambda k: k * u / (1 - k * u)
    n, b, d = x.shape
    f = wg.shape[2]
    tokens = b * max(np.bincount(block_expert, minlength=wg.shape[0]))
    W = lambda w: w[block_expert]  # (n, ., .) per block
    mm = lambda a, w: np.einsum("nbd,ndf->nbf", a, w)
    sig = lambda z: 1 / (1 + np.exp(-z))
    a, bb = mm(x, W(wg)), mm(x, W(wu))
    ea, eb = gamma(d) * mm(abs(x), abs(W(wg))), gamma(d) * mm(abs(x), abs(W(wu)))
    s = a * sig(a)
    ds_da = sig(a) * (1 + a * (1 - sig(a)))
    es = abs(ds_da) * ea + u * abs(s)
    h = s * bb
    eh = es * abs(bb) + abs(s) * eb + u * abs(h)
    y = mm(h, W(wd))
    ey = mm(eh, abs(W(wd))) + gamma(f) * mm(abs(h), abs(W(wd)))
    c = np.cos(y) * p
    ec = abs(np.sin(y)) * ey * abs(p) + 2 * u * abs(c)
    wT = lambda w: np.swapaxes(W(w), 1, 2)
    gh = mm(c, wT(wd))
    egh = mm(ec, abs(wT(wd))) + gamma(f) * mm(abs(c), abs(wT(wd)))
    gs, gb = gh * bb, gh * s
    egs = egh * abs(bb) + abs(gh) * eb + u * abs(gs)
    egb = egh * abs(s) + abs(gh) * es + u * abs(gb)
    ga = gs * ds_da
    d2 = 0.6  # max |silu''|
    ega = egs * abs(ds_da) + abs(gs) * d2 * ea + 2 * u * abs(ga)
    egx = mm(ega, abs(wT(wg))) + mm(egb, abs(wT(wu))) + gamma(2 * f) * (mm(abs(ga), abs(wT(wg))) + mm(abs(gb), abs(wT(wu))))

    def weight_grad(lhs, elhs, rhs, erhs):  # sum over the expert's tokens of lhs^T rhs
        per_block = (np.einsum("nbd,nbf->ndf", elhs, abs(rhs)) + np.einsum("nbd,nbf->ndf", abs(lhs), erhs)
                     + gamma(tokens) * np.einsum("nbd,nbf->ndf", abs(lhs), abs(rhs)))
        out = np.zeros((wg.shape[0], *per_block.shape[1:]))
        np.add.at(out, block_expert, per_block)
        return out

    zero = np.zeros_like(x)
    gates = weight_grad(x, zero, ga, ega)
    ups = weight_grad(x, zero, gb, egb)
    downs = weight_grad(h, eh, c, ec)
    return [2 * egx, 2 * gates, 2 * ups, 2 * downs]


@pytest.mark.parametrize("matmul", ["xla", "mkl"])
@pytest.mark.parametrize("n_tokens", [26, 600])
def test_dropless_skewed_routing_matches_loop_reference(n_tokens, matmul):
    """Skewed routing (most tokens on experts 0 and 1, as from a collapsed or fresh router): long
    block (or group) runs for two experts, short ones for the rest. Outputs and gradients equal the
    per-expert loop."""
    with matmul_mode(matmul):
        _check_skewed(n_tokens)


def _check_skewed(n_tokens):
    x, r, w = random_problem("topk", 2, seed=5, n=n_tokens, logit_bias=jnp.array([6.0, 5.0, 0.0, 0.0]))
    counts = jnp.bincount(r.experts.reshape(-1), length=E)
    assert int(counts[:2].min()) > 2 * int(counts[2:].max()), "the case should be skewed"
    _dropless_matches_loop(x, r, w, atol_y=1e-5, atol_g=1e-4)


def _dropless_matches_loop(x, r, w, atol_y: float, atol_g: float):
    """dropless_dispatch's outputs and gradients (x, weights, experts) equal the per-expert loop's."""
    run = lambda x, wt, w: D.dropless_dispatch(x, r.experts, wt, r.valid, w)
    reference = lambda x, wt, w: (D.moe_reference(x, r.experts, wt, r.valid, w), r.valid)
    (_, (y, _)), g_fast = with_grads(run)(x, r.weights, w)
    (_, (y_ref, _)), g_ref = with_grads(reference)(x, r.weights, w)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=atol_y)
    for a, b in zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=atol_g)


@pytest.mark.parametrize("act", ["swiglu", "relu"])
@pytest.mark.parametrize("case", [CASES[0], CASES[1]])
def test_ragged_dot_dispatch_for_accelerators_matches_loop_reference(monkeypatch, case, act):
    """Off the CPU (faked: cfm_jax.policy) dropless dispatch runs jax.lax.ragged_dot, the grouped GEMM
    of GPUs and TPUs; outputs and gradients equal the per-expert loop (top-k and top-p)."""
    from cfm_jax import policy

    monkeypatch.setattr(policy, "backend", lambda: "gpu")
    mode, k = case[0], case[1]
    x, r, w = random_problem(mode, k, act=act)
    _dropless_matches_loop(x, r, w, atol_y=1e-6, atol_g=1e-5)
