"""MoE expert parallelism (shard_map + all_to_all over the mesh axis `expert`) equals the single-device
layer: outputs, auxiliary loss, statistics and parameter gradients, on 8 faked CPU devices.

The device count must be fixed before jax is imported, so the checks run in a fresh interpreter:
this file is both the pytest test and (run as a script) the checks themselves.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

DEVICES = 8


# (axis type, mesh, configs): Auto over data x expert is what `train.mesh=data:2,expert:4` builds.
@pytest.mark.parametrize("axis_type,mesh,n_configs", [
    ("Auto", "data:2,expert:4", 1), pytest.param("Explicit", "expert:8", 2, marks=pytest.mark.slow)])
def test_expert_parallel_equals_single_device(axis_type, mesh, n_configs):
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={DEVICES}", "JAX_PLATFORMS": "cpu"}
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, __file__, axis_type, mesh, str(n_configs)], capture_output=True,
                         text=True, timeout=300, env=env, cwd=root)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("ok ") == n_configs and "bad mesh ok" in out.stdout, out.stdout


def _checks(axis_type: str, mesh_spec: str, n_configs: str) -> None:
    n_configs = int(n_configs)
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from baselines.moe import MoE, MoEConfig
    from cfm_jax.errors import UserError
    from cfm_jax.registry import LayerContext

    kind = getattr(jax.sharding.AxisType, axis_type)
    jax.config.update("jax_default_matmul_precision", "highest")
    assert jax.device_count() == DEVICES, jax.devices()
    axes = dict(part.split(":") for part in mesh_spec.split(","))
    mesh = jax.make_mesh(tuple(int(n) for n in axes.values()), tuple(axes), axis_types=(kind,) * len(axes))
    ctx = LayerContext(d_model=16, n_layers=2, layer=0, init_std=0.1)
    x = jax.random.normal(jax.random.key(1), (DEVICES, 6, 16))  # one sequence per device

    def forward_and_grads(module):
        graphdef, params, rest = nnx.split(module, nnx.Param, ...)

        def loss(params):
            y, aux = nnx.merge(graphdef, params, rest)(x)
            return jnp.sum(jnp.sin(y)) + aux["loss"], (y, aux)

        lowered = jax.jit(jax.value_and_grad(loss, has_aux=True)).lower(params)
        return lowered.compile()(params), lowered.as_text()

    configs = {  # the default tier runs the first (top-p, shared, sigmoid, drops, fixed groups)
        "capacity fixed groups top-p shared sigmoid": MoEConfig(
            n_experts=8, d_expert=8, routing="topp", max_k=3, n_shared=1, score="sigmoid", dispatch="capacity",
            capacity_factor=1.0, group_size=3),
        "dropless top-k": MoEConfig(n_experts=8, d_expert=8),
    }
    configs = dict(list(configs.items())[:n_configs])
    for name, cfg in configs.items():
        module = MoE(cfg, ctx, rngs=nnx.Rngs(0))
        ((_, (y1, aux1)), g1), text1 = forward_and_grads(module)
        with jax.set_mesh(mesh):
            ((_, (y2, aux2)), g2), text2 = forward_and_grads(module)
        assert "all_to_all" in text2 and "all_to_all" not in text1, "expert parallelism was not used"
        np.testing.assert_allclose(y2, y1, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(aux2["loss"], aux1["loss"], rtol=1e-5)
        for stat, value in aux1["stats"].items():
            np.testing.assert_allclose(aux2["stats"][stat], value, rtol=1e-5, atol=1e-7, err_msg=stat)
        for a, b in zip(jax.tree.leaves(g2), jax.tree.leaves(g1)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
        if cfg.dispatch == "capacity":
            assert float(aux1["stats"]["dropped_fraction"]) > 0, name
        print("ok", name, flush=True)

    try:
        with jax.set_mesh(mesh):
            MoE(MoEConfig(n_experts=6), ctx, rngs=nnx.Rngs(0))
    except UserError as e:
        assert f"n_experts=6 is not divisible by the mesh's expert axis ({axes['expert']} devices)" in str(e), e
        print("bad mesh ok")


if __name__ == "__main__":
    _checks(*sys.argv[1:])  # mesh axis type (Auto or Explicit), mesh (e.g. data:2,expert:4), configs to run
