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


def test_off_the_cpu_attention_is_the_fused_path_and_forward_mode_autodiff_works(monkeypatch):
    """Faked GPU backend: attention goes through jax.nn.dot_product_attention (never the CPU's
    block-causal layout), long sequences through the chunked path, and the model's forward-mode
    derivative (jax.jvp) runs, as the CPU-only hand-written VJPs are off there."""
    import jax
    from flax import nnx

    from cfm_jax.config import resolve
    from cfm_jax.layers import attention
    from cfm_jax.layers.model import build_model

    monkeypatch.setattr(policy, "backend", lambda: "gpu")
    calls = []
    fused = jax.nn.dot_product_attention
    monkeypatch.setattr(jax.nn, "dot_product_attention", lambda *a, **k: calls.append(k.get("implementation")) or fused(*a, **{**k, "implementation": None}))
    monkeypatch.setattr(attention, "block_causal_attention", lambda *a, **k: pytest.fail("CPU layout used off the CPU"))
    q = jax.random.normal(jax.random.key(0), (2, 256, 4, 16))
    out = attention._attend(q, q, q, query_chunk=1024, causal_block=128)
    assert calls == [None] and out.shape == q.shape
    np_ref = attention.attention_reference(q, q, q)
    assert float(jnp.max(jnp.abs(out - np_ref))) < 1e-4
    assert policy.attention_implementation(jnp.bfloat16) == "cudnn" and policy.attention_implementation(jnp.float32) is None
    assert not policy.hand_written_vjps()
    cfg = resolve("smoke", ["model.d_model=32", "data.seq_len=16"])
    model = build_model(cfg.model, 64, 0)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    loss = lambda p: jnp.sum(nnx.merge(graphdef, p, rest)(jnp.ones((1, 16), jnp.int32))[0])
    tangent = jax.tree.map(jnp.ones_like, params)
    _, directional = jax.jvp(loss, (params,), (tangent,))
    assert jnp.isfinite(directional)


def test_cudnn_refusal_falls_back_to_xla_and_says_so(monkeypatch, capsys):
    """Faked GPU with bfloat16 inputs asks for cuDNN; here (a CPU) it is refused, so XLA's path runs
    and one note line says which was used."""
    import jax

    from cfm_jax.layers import attention

    monkeypatch.setattr(policy, "backend", lambda: "gpu")
    monkeypatch.setattr(attention, "_said", set())
    q = jax.random.normal(jax.random.key(0), (1, 32, 2, 16)).astype(jnp.bfloat16)
    for _ in range(2):
        out = attention._attend(q, q, q, query_chunk=1024, causal_block=128)
    assert out.shape == q.shape and out.dtype == jnp.bfloat16
    err = capsys.readouterr().err
    assert err.count("note: cuDNN attention is not available here") == 1 and "XLA's fused path" in err
