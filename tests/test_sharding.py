"""Scale-out: sharded training steps equal the single-device step, and checkpoints move between meshes.

Each check runs tests/multidevice_checks.py in a subprocess with 8 faked CPU devices.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cfm_jax.errors import UserError
from cfm_jax.sharding import param_spec, parse_mesh

SCRIPT = Path(__file__).parent / "multidevice_checks.py"


def run_check(*args: str) -> dict:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


# data:8 with FSDP in the default tier; the other two meshes in the slow one (default tier near 10 min)
@pytest.mark.parametrize("mesh,fsdp", [pytest.param("data:8", "nofsdp", marks=pytest.mark.slow), ("data:8", "fsdp"),
                                       pytest.param("data:4", "fsdp", marks=pytest.mark.slow)])
def test_sharded_step_equals_single_device(mesh, fsdp):
    r = run_check("step", mesh, fsdp, "dense")
    assert r["loss_n"] == pytest.approx(r["loss_1"], rel=1e-6)
    assert r["max_param_diff"] < 1e-5 * r["param_scale"]
    if fsdp == "fsdp":
        assert any("data" in spec for spec in r["specs"]), "FSDP shards some weights over `data`"


@pytest.mark.slow  # default tier near 10 min; tests/test_moe_expert_parallel.py covers expert parallelism there
def test_expert_parallel_training_step_equals_single_device():
    """MoE under train.mesh: experts sharded over `expert`, tokens exchanged by all_to_all."""
    r = run_check("step", "data:2,expert:4", "nofsdp", "moe")
    assert r["loss_n"] == pytest.approx(r["loss_1"], rel=1e-6)
    assert r["max_param_diff"] < 1e-5 * r["param_scale"]
    assert any("expert" in spec for spec in r["specs"])


@pytest.mark.slow  # default tier kept near 10 min on 2 cores; `make test-slow` runs it
def test_checkpoint_saved_on_one_mesh_resumes_on_another(tmp_path):
    r = run_check("resume", str(tmp_path))
    assert len(r["single"]) == len(r["moved"]) == 6
    np.testing.assert_allclose(r["moved"], r["single"], rtol=1e-5)


def test_mesh_syntax_and_rules():
    assert parse_mesh("data:4,expert:2") == {"data": 4, "expert": 2} and parse_mesh("") == {}
    for bad in ("data", "model:2", "data:0", "data:2,data:2"):
        with pytest.raises(UserError, match="bad train.mesh entry"):
            parse_mesh(bad)

    class FakeMesh:
        axis_names = ("data", "expert")
        devices = np.empty((2, 4))

    assert str(param_spec("blocks/0/ffn/w_up", (8, 16, 32), FakeMesh, False)) == str(param_spec("x/w_gate", (4, 1, 1), FakeMesh, False))
    assert param_spec("blocks/0/ffn/up/kernel", (16, 64), FakeMesh, True)[1] == "data"  # largest dim
    assert param_spec("blocks/0/ffn/up/kernel", (16, 64), FakeMesh, False) == param_spec("norm/scale", (16,), FakeMesh, True)
