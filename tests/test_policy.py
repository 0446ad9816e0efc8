"""The backend-specific choices, asked of cfm_jax.policy: faking the backend there flips every one."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

from baselines import gated_linear_attention as gla
from baselines import mamba
from cfm_jax import policy
from cfm_jax.kernels import cblas


@pytest.mark.parametrize("name", ["gpu", "tpu"])
def test_accelerator_backends_get_the_plain_jax_paths(monkeypatch, name):
    monkeypatch.setattr(policy, "backend", lambda: name)
    assert not policy.cpu_kernels()
    assert mamba.pick_scan("auto") == "associative"
    assert gla.pick_scan("auto", 4, 4) == "matmul"  # a small state: still no token loop off the CPU
    matmuls, why = cblas.backend(jnp.ones((256, 256)), flops=1 << 40)
    assert matmuls == "xla" and f"backend is {name}" in why


def test_cpu_backend_gets_the_cpu_choices():
    assert policy.on_cpu() and policy.cpu_kernels()
    assert gla.pick_scan("auto", 4, 4) == "sequential" and gla.pick_scan("auto", 64, 64) == "matmul"
    assert mamba.pick_scan("auto") in ("kernel", "sequential")
