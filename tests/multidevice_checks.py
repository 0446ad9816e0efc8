"""Multi-device checks, run by tests/test_sharding.py in a subprocess with 8 faked CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=8 must be set before jax is imported).

    python tests/multidevice_checks.py step MESH FSDP FFN   -> JSON: max differences vs one device
    python tests/multidevice_checks.py resume WORKDIR        -> JSON: losses of a run resumed on another mesh
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from cfm_jax import workdir as wd
from cfm_jax.config import resolve
from cfm_jax.data import make_task
from cfm_jax.sharding import global_batch, make_mesh, state_shardings
from cfm_jax.train import init_state, make_train_step, train

TINY = ["model.d_model=32", "data.seq_len=16", "train.batch_size=16", "train.warmup_steps=0", "train.lr=1e-3",
        "data.eval_batches=1"]


def one_step(overrides: list[str], mesh_spec: str, fsdp: bool):
    cfg = resolve("smoke", [*TINY, *overrides])
    task = make_task(cfg.data)
    graphdef, state, tx, _ = init_state(cfg, task.vocab_size)
    step = make_train_step(graphdef, tx)
    batch = task.train_batch(0, 0, cfg.train.batch_size)
    mesh = make_mesh(mesh_spec)
    if mesh is None:
        out = step(state["params"], state["rest"], state["opt_state"], batch, 0)
    else:
        state = jax.device_put(state, state_shardings(state, tx, mesh, fsdp))
        with jax.set_mesh(mesh):
            out = step(state["params"], state["rest"], state["opt_state"], global_batch(batch, mesh), 0)
    params, metrics = out[0], out[3]
    shardings = sorted({str(x.sharding.spec) for x in jax.tree.leaves(params) if hasattr(x.sharding, "spec")})
    return float(metrics["loss"]), jax.tree.map(np.asarray, params), shardings


def check_step(mesh_spec: str, fsdp: bool, ffn: str) -> dict:
    overrides = ["model.ffn=moe", "model.ffn.n_experts=4"] if ffn == "moe" else []
    loss_1, params_1, _ = one_step(overrides, "", False)
    loss_n, params_n, specs = one_step(overrides, mesh_spec, fsdp)
    diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), params_1, params_n))
    scale = max(float(np.max(np.abs(x))) for x in jax.tree.leaves(params_1))
    return {"loss_1": loss_1, "loss_n": loss_n, "max_param_diff": max(diffs), "param_scale": scale, "specs": specs}


def check_resume(root: str) -> dict:
    root = Path(root)
    base = [*TINY, "train.steps=6", "train.checkpoint_every=2", "train.log_every=1"]
    train(resolve("smoke", base), root / "single", progress=False)
    train(resolve("smoke", [*base, "train.mesh=data:8"]), root / "moved", progress=False)
    for step_dir in (root / "moved" / "checkpoints").iterdir():  # crash after step 2
        if step_dir.name.isdigit() and int(step_dir.name) > 2:
            shutil.rmtree(step_dir)
    train(resolve("smoke", [*base, "train.mesh=data:2", "train.fsdp=true"]), root / "moved", progress=False)
    losses = lambda d: [r["loss"] for r in wd.read_metrics(root / d)]
    return {"single": losses("single"), "moved": losses("moved")}


if __name__ == "__main__":
    assert jax.device_count() == 8, "set XLA_FLAGS=--xla_force_host_platform_device_count=8"
    jax.config.update("jax_default_matmul_precision", "highest")
    if sys.argv[1] == "step":
        print(json.dumps(check_step(sys.argv[2], sys.argv[3] == "fsdp", sys.argv[4])))
    else:
        print(json.dumps(check_resume(sys.argv[2])))
