"""Mixer `mamba`: chunked selective scan == sequential reference (outputs, final state, gradients),
decode == parallel forward, bf16 stability, reference init, accounting and the memory horizon."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from baselines.mamba import (Mamba, MambaConfig, chunk_length, pick_scan, selective_scan, selective_scan_chunked,
                             selective_scan_reference)
from baselines.gated_linear_attention import HORIZON_MAX, retained_fraction
from cfm_jax.errors import UserError
from cfm_jax.kernels import selective_scan as scan_kernel
from cfm_jax.registry import LayerContext

RTOL, ATOL = 6e-4, 2e-3  # mamba_ssm's fp32 selective-scan test: outputs, final state and gradients
BATCH, L, E, N = 2, 63, 6, 4  # L is not a multiple of the chunk
CHUNK = 16


@pytest.mark.parametrize("scan,max_elements,batch", [("sequential", None, BATCH), ("associative", None, BATCH),
                                                      ("auto", None, BATCH), ("sequential", 2 * 5 * E * N, BATCH),
                                                      ("sequential", None, 1), ("kernel", None, BATCH),
                                                      ("kernel", None, 1)])
def test_chunked_matches_reference(scan, max_elements, batch, monkeypatch):
    """Nonzero initial state; strong decay in the first channels (dt A down to -21.5 per token, so
    exp(dt A) ~ 5e-10) and slow decay in the last (dt A up to -1.4e-4). max_elements: a per-chunk
    budget that shortens the chunks to 5 tokens (not dividing L). Batch 1 takes the sequential
    kernel's squeezed-batch reductions. `kernel`: the C++ scan (cfm_jax/kernels/selective_scan.py),
    E = 6 channels in one partly filled block of 16 lanes."""
    if scan == "kernel" and (why := scan_kernel.available()):
        pytest.skip(why)
    if max_elements:
        monkeypatch.setattr("baselines.mamba.MAX_CHUNK_ELEMENTS", max_elements)
        assert chunk_length(CHUNK, batch, E * N) == 5
    ks = jax.random.split(jax.random.key(0), 7)
    u = jax.random.normal(ks[0], (batch, L, E))
    dt = jax.nn.softplus(jax.random.normal(ks[1], (batch, L, E)) + jnp.array([3.0, 3.0, -2, -2, -5, -5]))
    A = -jnp.exp(jax.random.normal(ks[2], (E, N)))
    Bm, Cm = (jax.random.normal(key, (batch, L, N)) for key in ks[3:5])
    h0 = jax.random.normal(ks[5], (batch, E, N))
    assert_matches_reference(lambda *a: selective_scan(*a, chunk=CHUNK, scan=scan), (u, dt, A, Bm, Cm, h0), ks[6])


def assert_matches_reference(scan, operands, key):
    """scan(u, dt, A, B, C, h0) equals `selective_scan_reference`: y, final h and the gradients of a
    random linear function of both with respect to all six operands."""
    u, h0 = operands[0], operands[5]
    ky, kh = jax.random.split(key)
    wy, wh = jax.random.normal(ky, u.shape), jax.random.normal(kh, h0.shape)

    def run(kernel):
        def loss(*a):
            y, h = kernel(*a)
            return jnp.sum(y * wy) + jnp.sum(h * wh), (y, h)

        return jax.jit(jax.value_and_grad(loss, argnums=tuple(range(6)), has_aux=True))(*operands)

    (_, (y_ref, h_ref)), g_ref = run(selective_scan_reference)
    (_, (y, h)), g = run(scan)
    np.testing.assert_allclose(y, y_ref, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(h, h_ref, rtol=RTOL, atol=ATOL)
    for name, a, b in zip("u dt A B C h0".split(), g, g_ref):
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL, err_msg=name)


@pytest.mark.parametrize("batch,length,channels", [(2, 150, 20), (1, 64, 16), (3, 129, 33)])
def test_kernel_matches_reference_over_many_chunks(batch, length, channels):
    """The C++ scan's backward pass keeps a state every 64 tokens: lengths over, at and past that
    stride, channel counts filling one, two or three blocks of 16 lanes, the last partly. Channel 0
    decays by more than e^-87.3 per token, below which the kernel's exp is 0."""
    if why := scan_kernel.available():
        pytest.skip(why)
    ks = jax.random.split(jax.random.key(7), 7)
    u = jax.random.normal(ks[0], (batch, length, channels))
    dt = jax.nn.softplus(jax.random.normal(ks[1], (batch, length, channels)) + jnp.linspace(3, -5, channels))
    A = (-jnp.exp(jax.random.normal(ks[2], (channels, N)))).at[0].set(-40.0)
    assert float(jnp.min(dt[..., :1] * A[0])) < -87.4
    Bm, Cm = (jax.random.normal(key, (batch, length, N)) for key in ks[3:5])
    h0 = jax.random.normal(ks[5], (batch, channels, N))
    assert_matches_reference(lambda *a: selective_scan(*a, scan="kernel"), (u, dt, A, Bm, Cm, h0), ks[6])


def test_kernel_sums_do_not_depend_on_the_cpu_count():
    """dB, dC and dA sum over channels or sequences in a fixed order of work units, not per thread:
    one CPU and all of them give the same bits (resumed runs reproduce on any machine size)."""
    if (why := scan_kernel.available()) or len(os.sched_getaffinity(0)) < 2:
        pytest.skip(why or "needs 2 CPUs")
    ks = jax.random.split(jax.random.key(9), 5)
    b, length, channels = 3, 70, 100  # 7 blocks of 16 channels
    u, Bm, Cm = (jax.random.normal(k, shape) for k, shape in zip(ks, [(b, length, channels), (b, length, N), (b, length, N)]))
    dt = jax.nn.softplus(jax.random.normal(ks[3], (b, length, channels)))
    A = -jnp.exp(jax.random.normal(ks[4], (channels, N)))
    grads = jax.jit(jax.grad(lambda *a: jnp.sum(jnp.sin(scan_kernel.selective_scan_kernel(*a)[0])), argnums=(0, 1, 2, 3, 4)))
    h0 = jnp.zeros((b, channels, N))
    everyone = os.sched_getaffinity(0)

    def pin(cpus):  # every thread of the process: the kernel runs on one of XLA's
        for tid in os.listdir("/proc/self/task"):
            os.sched_setaffinity(int(tid), cpus)

    all_cpus = jax.block_until_ready(grads(u, dt, A, Bm, Cm, h0))
    try:
        pin({min(everyone)})
        one_cpu = jax.block_until_ready(grads(u, dt, A, Bm, Cm, h0))
    finally:
        pin(everyone)
    for x, y in zip(all_cpus, one_cpu):
        np.testing.assert_array_equal(x, y)


def test_kernel_refuses_misshapen_operands():
    if why := scan_kernel.available():
        pytest.skip(why)
    u, A = jnp.ones((2, 5, 3)), -jnp.ones((3, 4))
    with pytest.raises(ValueError, match=r"h0 is float32\[3, 4\], expected float32\[2, 3, 4\]"):
        scan_kernel.selective_scan_kernel(u, u, A, jnp.ones((2, 5, 4)), jnp.ones((2, 5, 4)), jnp.ones((3, 4)))


def test_pick_scan(monkeypatch):
    """auto: the C++ kernel on one CPU device where it builds; the sequential chunks on several
    devices (XLA cannot partition the custom call); `kernel` where it cannot build is a one-line error."""
    if scan_kernel.available() is None:
        assert pick_scan("auto") == "kernel"
    monkeypatch.setattr(jax, "device_count", lambda: 8)
    assert pick_scan("auto") == "sequential" and pick_scan("associative") == "associative"
    monkeypatch.setattr(scan_kernel, "available", lambda: "no C++ compiler")
    with pytest.raises(UserError, match="scan=kernel cannot run: no C.. compiler"):
        pick_scan("kernel")


def build(d_model: int = 32, **overrides) -> Mamba:
    cfg = MambaConfig(chunk_size=CHUNK, **overrides)
    cfg.validate(d_model)
    return Mamba(cfg, LayerContext(d_model, 2, 0, 0.1), rngs=nnx.Rngs(0))


def test_decode_matches_forward():
    """Token-by-token `step` (conv + SSM state) == the chunked forward over several chunks."""
    module = build()
    x = jax.random.normal(jax.random.key(1), (2, 37, 32))
    y, _ = nnx.jit(lambda m, x: m(x))(module, x)
    step = nnx.jit(lambda m, xt, s: m.step(xt, s))
    state, outs = module.init_state(2, 37), []
    for t in range(x.shape[1]):
        yt, state = step(module, x[:, t], state)
        outs.append(yt)
    np.testing.assert_allclose(jnp.stack(outs, axis=1), y, rtol=1e-4, atol=1e-5)


def test_bf16_long_sequence_is_finite():
    module = build(d_model=16)
    x = jax.random.normal(jax.random.key(2), (1, 2048, 16), jnp.bfloat16) * 3
    y, aux = nnx.jit(lambda m, x: m(x))(module, x)
    assert bool(jnp.all(jnp.isfinite(y))) and bool(jnp.isfinite(aux["stats"]["memory_horizon"]))
    bf16 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    y, h = jax.eval_shape(selective_scan_chunked, bf16(1, 2048, 4), bf16(1, 2048, 4), bf16(4, 2), bf16(1, 2048, 2),
                          bf16(1, 2048, 2))
    assert y.dtype == h.dtype == jnp.float32  # the scan runs in fp32 whatever the input dtype


def test_reference_init():
    assert MambaConfig().rank(40) == 3  # ceil(d_model / 16)
    module = build()
    assert module.dt_proj.in_features == 2 and module.d_inner == 64
    np.testing.assert_allclose(module.A()[0], -np.arange(1, 17), rtol=1e-6)  # S4D-real
    dt = np.asarray(jax.nn.softplus(module.dt_proj.bias[...]))
    assert dt.min() >= 1e-3 * (1 - 1e-4) and dt.max() <= 0.1 * (1 + 1e-4)
    np.testing.assert_allclose(module.D[...], 1.0)


def test_accounting_and_horizon():
    module = build(d_model=32)  # E = 64, N = 16, d_conv = 4
    assert module.state_bytes(16) == module.state_bytes(10_000) == 64 * (16 + 3) * 4
    assert module.flops_per_token(16) == module.flops_per_token(10_000) > 0
    n_params = sum(p.size for p in jax.tree.leaves(nnx.state(module, nnx.Param)))
    assert module.cfg.param_count(32) == n_params
    # Zero input: l_{e,n} = softplus(dt_bias_e) * A_{e,n}; the horizon is where the mean retained
    # fraction crosses the threshold.
    ell = module.decay_stats()
    assert ell.shape == (64 * 16,) and bool(jnp.all(ell < 0))
    h = module.memory_horizon()
    assert float(retained_fraction(ell, h * 0.99)) > 0.01 > float(retained_fraction(ell, h * 1.01))
    x = jax.random.normal(jax.random.key(3), (2, 20, 32))
    assert 0 < module.memory_horizon(0.5, x) < module.memory_horizon(0.01, x) < HORIZON_MAX


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"d_state": 0}, "d_state=0 must be >= 1"),
        ({"d_conv": 0}, "d_conv=0"),
        ({"dt_min": 0.5}, "dt_min=0.5"),
        ({"chunk_size": 0}, "chunk_size=0"),
        ({"scan": "parallel"}, "scan='parallel' is not one of"),
    ],
)
def test_bad_config(overrides, match):
    with pytest.raises(UserError, match=match):
        MambaConfig(**overrides).validate(32)
