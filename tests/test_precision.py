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
