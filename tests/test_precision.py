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


def test_bfloat16_training_keeps_float32_checkpoints_and_resumes(tmp_path):
    cfg = resolve("smoke", ["model.dtype=bfloat16", "model.d_model=32", "data.seq_len=64", "train.steps=4",
                            "train.checkpoint_every=2"])
    last = train(cfg, tmp_path / "w", progress=False)
    assert np.isfinite(last["loss"])
    more = train(resolve("smoke", ["model.dtype=bfloat16", "model.d_model=32", "data.seq_len=64", "train.steps=6",
                                   "train.checkpoint_every=2"]), tmp_path / "w", progress=False)
    assert [r["step"] for r in wd.read_metrics(tmp_path / "w")][-1] == 6 and np.isfinite(more["loss"])
    from cfm_jax.train import restore_model

    model, step = restore_model(tmp_path / "w", cfg, 256)
    assert step == 6 and all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.slow  # default tier kept near 10 min on 2 cores; `make test-slow` runs it
@pytest.mark.parametrize("kind", [("mixer", k) for k in registry.kinds("mixer")] + [("ffn", k) for k in registry.kinds("ffn")])
def test_every_kind_stays_finite_in_bfloat16_at_4k_tokens(kind):
    slot, name = kind
    losses = _first_losses(["data.seq_len=4096", "train.batch_size=1", "model.d_model=32", f"model.{slot}={name}"])
    assert np.isfinite(losses["bfloat16"]) and losses["bfloat16"] == pytest.approx(losses["float32"], abs=0.05)
