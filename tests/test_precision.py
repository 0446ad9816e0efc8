"""model.dtype=bfloat16: bfloat16 matmuls and activations, float32 parameters, optimizer state,
checkpoints and loss; long sequences stay finite."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cfm_jax import registry
from cfm_jax import workdir as wd
from cfm_jax.config import resolve
from cfm_jax.data import make_task
from cfm_jax.layers.precision import compute_view
from cfm_jax.train import init_state, make_train_step, train


def _first_losses(overrides):
    """Loss of the first training step in float32 and in bfloat16 (same init, same batch)."""
    out = {}
    for dtype in ("float32", "bfloat16"):
        cfg = resolve("smoke", [*overrides, f"model.dtype={dtype}"])
        task = make_task(cfg.data)
        graphdef, state, tx, _ = init_state(cfg, task.vocab_size)
        step = make_train_step(graphdef, tx, dtype=dtype)
        params, _, _, metrics = step(state["params"], state["rest"], state["opt_state"], task.train_batch(0, 0, cfg.train.batch_size), 0)
        assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params) if jnp.issubdtype(p.dtype, jnp.floating))
        out[dtype] = float(metrics["ce"])
    return out


def test_compute_view_casts_matrices_only():
    state = {"w": jnp.ones((3, 4)), "scale": jnp.ones((4,)), "step": jnp.zeros((), jnp.int32)}
    view = compute_view(state, "bfloat16")
    assert view["w"].dtype == jnp.bfloat16 and view["scale"].dtype == jnp.float32 and view["step"].dtype == jnp.int32
    assert compute_view(state, "float32") is state


def _matmul_dtypes(closed_jaxpr) -> list[tuple[str, str]]:
    """(dtype, dtype, shapes) of every dot_general in a jaxpr, sub-jaxprs (scans, custom VJPs) included."""
    out = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                out.append((*(str(v.aval.dtype) for v in eqn.invars), tuple(v.aval.shape for v in eqn.invars)))
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(closed_jaxpr.jaxpr)
    return out


# The accelerator path (faked tpu: XLA's fused attention, plain autodiff) in the default tier; the CPU
# path (hand-written VJPs, CPU attention layouts; bfloat16 is slower than float32 there) in the slow one.
@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=pytest.mark.slow), "tpu"])
@pytest.mark.parametrize("slot,kind", [("mixer", k) for k in registry.kinds("mixer")]
                         + [("ffn", k) for k in registry.kinds("ffn")])
def test_bfloat16_compute_runs_the_projections_in_bfloat16(slot, kind, backend, monkeypatch):
    """Under model.dtype=bfloat16 no matmul mixes a bfloat16 operand with a float32 one (XLA would
    run it in float32: activations lifted by a float32 norm scale or embedding did exactly that), and
    at least the FFN and projection matmuls of every layer run in bfloat16, forward and backward.
    float32 x float32 matmuls remain only where a kind computes in float32 on purpose (recurrent
    state, the MoE router), and float32 x bfloat16 ones only against attention's (seq x seq) score
    matrix in its backward pass, as jax.nn.dot_product_attention's own XLA path does (scores and
    softmax in float32)."""
    from cfm_jax import policy
    from cfm_jax.config import ModelConfig
    from cfm_jax.layers.model import LanguageModel

    monkeypatch.setattr(policy, "backend", lambda: backend)  # tpu: the accelerator paths, XLA's attention
    cfg = ModelConfig(d_model=32, n_layers=2, dtype="bfloat16", **{slot: registry.default_config(slot, kind)})
    graphdef, params, rest = nnx.split(LanguageModel(cfg, 64, rngs=nnx.Rngs(0)), nnx.Param, ...)

    def loss(p, tokens):
        logits, aux = nnx.merge(graphdef, compute_view(p, "bfloat16"), rest)(tokens)
        return jnp.mean(logits) + aux["loss"]

    seq = 24  # distinct from d_model (32), batch * seq (48) and the head size (8): a (seq, seq) pair is scores
    dots = _matmul_dtypes(jax.make_jaxpr(jax.grad(loss))(params, jnp.zeros((2, seq), jnp.int32)))
    scores = lambda shapes: any(list(shape).count(seq) >= 2 for shape in shapes)
    mixed = [d for d in dots if d[0] != d[1] and not scores(d[2])]
    assert not mixed, f"{kind}: matmuls mixing dtypes {mixed}"
    assert sum(d[:2] == ("bfloat16", "bfloat16") for d in dots) >= 2 * cfg.n_layers * 3, dots


@pytest.mark.parametrize("mixer", ["attention", "gla"])
def test_bfloat16_first_step_matches_float32_at_4k_tokens(mixer):
    losses = _first_losses(["data.seq_len=4096", "train.batch_size=1", "model.d_model=32", f"model.mixer={mixer}"])
    assert np.isfinite(losses["bfloat16"]) and losses["bfloat16"] == pytest.approx(losses["float32"], abs=0.05)


def test_bfloat16_training_keeps_float32_checkpoints_and_resumes_bit_identically(tmp_path):
    """A bfloat16 run killed after its step-4 checkpoint and resumed repeats the uninterrupted run's
    losses bit for bit; its checkpoints hold float32 parameters."""
    import shutil

    from cfm_jax.train import restore_model

    cfg = resolve("smoke", ["model.dtype=bfloat16", "model.d_model=32", "data.seq_len=64", "train.steps=8",
                            "train.checkpoint_every=4", "train.log_every=1"])
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    train(cfg, full, progress=False)
    shutil.copytree(full, crashed)
    shutil.rmtree(crashed / "checkpoints" / "8")  # the crash came before the last save
    train(cfg, crashed, progress=False)
    losses = lambda w: [(r["step"], r["loss"]) for r in wd.read_metrics(w)]
    assert losses(crashed) == losses(full) and len(losses(full)) == 8 and all(np.isfinite(l) for _, l in losses(full))
    model, step = restore_model(crashed, cfg, 256)
    assert step == 8 and all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.slow  # default tier kept near 10 min on 2 cores; `make test-slow` runs it
@pytest.mark.parametrize("kind", [("mixer", k) for k in registry.kinds("mixer")] + [("ffn", k) for k in registry.kinds("ffn")])
def test_every_kind_stays_finite_in_bfloat16_at_4k_tokens(kind):
    slot, name = kind
    losses = _first_losses(["data.seq_len=4096", "train.batch_size=1", "model.d_model=32", f"model.{slot}={name}"])
    assert np.isfinite(losses["bfloat16"]) and losses["bfloat16"] == pytest.approx(losses["float32"], abs=0.05)
