"""MKL matmuls inside XLA (cfm_jax.kernels.cblas) against XLA's own dot: outputs and gradients."""

import json
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cfm_jax.config import ModelConfig
from cfm_jax.errors import UserError
from cfm_jax.kernels import cblas, mkl_calibration

needs_mkl = pytest.mark.skipif(cblas._mkl_runtime() is None or jax.default_backend() != "cpu",
                               reason="MKL runtime not installed (pip install mkl), or not a CPU backend")


@pytest.fixture(autouse=True)
def _default_mode(monkeypatch):
    """Each test starts from CFM_JAX_MATMUL=auto, whatever the shell set."""
    monkeypatch.delenv(cblas.ENV, raising=False)

CASES = [  # (a shape, b shape, transpose_b): the projections' 2-D products and attention's batched ones
    ((96, 80), (80, 72), False),
    ((96, 80), (72, 80), True),
    ((6, 40, 32), (6, 32, 48), False),
    ((6, 40, 32), (6, 48, 32), True),
]


def _reference(a, b, transpose_b):
    return jnp.einsum("...mk,...nk->...mn" if transpose_b else "...mk,...kn->...mn", a, b,
                      precision=jax.lax.Precision.HIGHEST)


@needs_mkl
@pytest.mark.parametrize("shape_a, shape_b, transpose_b", CASES)
def test_matches_xla_dot_outputs_and_gradients(shape_a, shape_b, transpose_b):
    ka, kb, kg = jax.random.split(jax.random.key(0), 3)
    a, b = jax.random.normal(ka, shape_a), jax.random.normal(kb, shape_b)
    fast = jax.jit(lambda a, b: cblas.matmul(a, b, transpose_b=transpose_b))
    with cblas.forced("mkl"):  # small test shapes: auto would keep them in XLA
        assert "ffi_call" in str(jax.make_jaxpr(fast)(a, b)), "the MKL path did not run"
        out = fast(a, b)
    np.testing.assert_allclose(out, _reference(a, b, transpose_b), rtol=1e-5, atol=1e-5)
    g = jax.random.normal(kg, out.shape)  # a random cotangent: every gradient entry is exercised
    with cblas.forced("mkl"):
        _, vjp_fast = jax.vjp(lambda a, b: cblas.matmul(a, b, transpose_b=transpose_b), a, b)
        grads = jax.jit(vjp_fast)(g)
    _, vjp_ref = jax.vjp(lambda a, b: _reference(a, b, transpose_b), a, b)
    for got, want in zip(grads, vjp_ref(g)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@needs_mkl
@pytest.mark.parametrize("shape_a, shape_b, transpose_b", CASES)
def test_within_float32_rounding_bound(shape_a, shape_b, transpose_b):
    """Against a float64 product of the same float32 inputs, every entry is within the textbook bound
    for a float32 inner product of length K, gamma_K * (|a| |b|) with gamma_K = K u / (1 - K u), u =
    2^-24: MKL rounds differently from XLA, but never outside float32 accuracy (a bf16 or TF32 shortcut
    rounds its inputs ~100x coarser than this bound allows)."""
    ka, kb = jax.random.split(jax.random.key(1))
    a, b = 4 * jax.random.normal(ka, shape_a), 4 * jax.random.normal(kb, shape_b)
    spec = "...mk,...nk->...mn" if transpose_b else "...mk,...kn->...mn"
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    with cblas.forced("mkl"):
        got = np.asarray(jax.jit(lambda a, b: cblas.matmul(a, b, transpose_b))(a, b), np.float64)
    k, u = shape_a[-1], 2.0**-24
    bound = k * u / (1 - k * u) * np.einsum(spec, np.abs(a64), np.abs(b64))
    assert np.all(np.abs(got - np.einsum(spec, a64, b64)) <= bound)


@needs_mkl
def test_model_loss_and_gradients_match_xla(monkeypatch):
    from cfm_jax.layers.model import LanguageModel

    model = LanguageModel(ModelConfig(d_model=64, n_layers=2), 256, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tokens = jax.random.randint(jax.random.key(1), (2, 33), 0, 256)

    def loss(p):
        logits, aux = nnx.merge(graphdef, p, rest)(tokens[:, :-1])
        return -jnp.mean(jax.nn.log_softmax(logits)[..., 0]) + aux["loss"]

    results = {}
    for mode in ("xla", "mkl"):
        monkeypatch.setenv(cblas.ENV, mode)  # read when traced: each mode gets its own trace
        step = jax.jit(jax.value_and_grad(loss))
        assert ("ffi_call" in str(jax.make_jaxpr(step)(params))) == (mode == "mkl")
        results[mode] = step(params)
    (lx, gx), (lm, gm) = results["xla"], results["mkl"]
    np.testing.assert_allclose(lm, lx, rtol=1e-5)
    for x, m in zip(jax.tree.leaves(gx), jax.tree.leaves(gm)):
        np.testing.assert_allclose(m, x, rtol=1e-4, atol=1e-6)


@needs_mkl
@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("batch", [(), (3,)])
def test_product_matches_xla_for_every_transpose(trans_a, trans_b, batch):
    """`product` (for hand-written backward passes, e.g. the MoE's blocked_ffn) in MKL equals XLA's."""
    m, k, n = 24, 40, 16
    ka, kb = jax.random.split(jax.random.key(2))
    a = jax.random.normal(ka, (*batch, *((k, m) if trans_a else (m, k))))
    b = jax.random.normal(kb, (*batch, *((n, k) if trans_b else (k, n))))
    fast = jax.jit(lambda a, b: cblas.product(a, b, trans_a, trans_b))
    with cblas.forced("mkl"):
        assert "ffi_call" in str(jax.make_jaxpr(fast)(a, b))
        out = fast(a, b)
    with cblas.forced("xla"):
        ref = cblas.product(a, b, trans_a, trans_b)
    assert ref.shape == (*batch, m, n)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_falls_back_to_xla_where_mkl_cannot_run(monkeypatch):
    a = jnp.ones((8, 4), jnp.bfloat16)
    assert cblas.backend(a, a)[0] == "xla" and "bfloat16" in cblas.backend(a, a)[1]
    row = jnp.ones((1, 512))  # batch-1 decode: faster in XLA under auto ...
    assert "ffi_call" not in str(jax.make_jaxpr(cblas.matmul)(row, jnp.ones((512, 1536))))
    if not cblas.mkl_unavailable(row):  # ... while a training-size product runs in MKL where MKL pays
        rows = jnp.ones((4096, 512))
        monkeypatch.setenv(mkl_calibration.ENV, "1")
        assert "ffi_call" in str(jax.make_jaxpr(cblas.matmul)(rows, jnp.ones((512, 512))))
        monkeypatch.setenv(mkl_calibration.ENV, "0")  # (another shape: a traced shape keeps its backend)
        assert "ffi_call" not in str(jax.make_jaxpr(cblas.matmul)(rows, jnp.ones((512, 640))))
        monkeypatch.delenv(mkl_calibration.ENV)
    np.testing.assert_array_equal(cblas.matmul(a, a.T), a @ a.T)
    monkeypatch.setattr(jax, "device_count", lambda: 8)  # a sharded step: XLA cannot partition the call
    f = jnp.ones((8, 4))
    assert cblas.backend(f, f) == ("xla", "8 devices (MKL path is single-device)")
    monkeypatch.setenv(cblas.ENV, "xla")
    assert cblas.backend(f, f)[0] == "xla"


def test_bad_mode_and_impossible_mkl_are_one_line_errors(monkeypatch):
    monkeypatch.setenv(cblas.ENV, "blas")
    with pytest.raises(UserError, match="CFM_JAX_MATMUL='blas'.*allowed: auto, xla, mkl"):
        cblas.matmul(jnp.ones((2, 2)), jnp.ones((2, 2)))
    monkeypatch.setenv(cblas.ENV, "mkl")
    with pytest.raises(UserError, match="cannot run: dtype bfloat16"):
        cblas.matmul(jnp.ones((2, 2), jnp.bfloat16), jnp.ones((2, 2), jnp.bfloat16))


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match=r"\(3, 4\) @ \(5, 2\)"):
        cblas.matmul(jnp.ones((3, 4)), jnp.ones((5, 2)))
    with pytest.raises(ValueError, match=r"got \(3, 4\) and \(5, 2\)"):
        cblas.product(jnp.ones((3, 4)), jnp.ones((5, 2)))


@needs_mkl
def test_empty_contraction_gives_zeros():
    """k = 0 (an empty sum) comes out as zeros, as in XLA, not as untouched memory."""
    with cblas.forced("mkl"):
        out = jax.jit(lambda a, b: cblas.product(a, b))(jnp.ones((16, 0)), jnp.ones((0, 5)))
    np.testing.assert_array_equal(out, np.zeros((16, 5)))


GROUP_SIZES = [  # (group sizes for 30 rows): empty groups, rows past the last group, all in one, none
    [7, 0, 12, 5],
    [30, 0, 0, 0],
    [0, 0, 0, 0],
    [0, 9, 0, 21],
]


@pytest.mark.parametrize("sizes", GROUP_SIZES)
@pytest.mark.parametrize("transpose_b", [False, True])
@pytest.mark.parametrize("matmul", ["mkl", "xla"])
def test_grouped_matmul_matches_reference_outputs_and_gradients(matmul, transpose_b, sizes):
    """`grouped_matmul` (MKL: one sgemm per group; XLA: ragged_dot) against gathering each row's
    group matrix: outputs and gradients wrt both operands; rows past the last group are zero."""
    if matmul == "mkl" and (why := cblas.mkl_unavailable(jnp.ones((8, 8)))):
        pytest.skip(f"MKL matmuls cannot run here: {why}")
    ka, kb, kp = jax.random.split(jax.random.key(4), 3)
    a = jax.random.normal(ka, (30, 16))
    b = jax.random.normal(kb, (4, 24, 16) if transpose_b else (4, 16, 24))
    s = jnp.array(sizes, jnp.int32)
    probe = jax.random.normal(kp, (30, 24))

    def loss(fn):
        return jax.jit(jax.value_and_grad(lambda a, b: jnp.sum(jnp.sin(fn(a, b, s, transpose_b)) * probe), argnums=(0, 1)))

    with cblas.forced(matmul):
        fast = jax.jit(lambda a, b: cblas.grouped_matmul(a, b, s, transpose_b))
        assert ("ffi_call" in str(jax.make_jaxpr(fast)(a, b))) == (matmul == "mkl")
        out = fast(a, b)
        l_fast, g_fast = loss(cblas.grouped_matmul)(a, b)
    ref = cblas.grouped_matmul_reference(a, b, s, transpose_b)
    l_ref, g_ref = loss(cblas.grouped_matmul_reference)(a, b)
    np.testing.assert_array_equal(out[sum(sizes):], 0.0)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(l_fast, l_ref, rtol=1e-5, atol=1e-5)
    for x, y in zip(g_fast, g_ref):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)


def test_grouped_matmul_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match=r"got \(30, 16\), \(4, 8, 24\) and \(4,\)"):
        cblas.grouped_matmul(jnp.ones((30, 16)), jnp.ones((4, 8, 24)), jnp.zeros(4, jnp.int32))
    with pytest.raises(ValueError, match=r"group_sizes \(G,\)"):
        cblas.grouped_matmul(jnp.ones((30, 16)), jnp.ones((4, 16, 24)), jnp.zeros(3, jnp.int32))


def test_auto_takes_mkl_only_where_it_was_measured_faster(monkeypatch):
    """auto follows the measurement (here faked both ways); CFM_JAX_MATMUL=mkl ignores it; the
    measurement's verdict needs MKL at least MARGIN faster; a bad CFM_JAX_MKL_PAYS is one line."""
    big = jnp.ones((4096, 512))
    for pays in (True, False):
        monkeypatch.setattr(mkl_calibration, "measured", lambda pays=pays: (pays, "faked"))
        expected = "mkl" if pays and not cblas.mkl_unavailable(big) else "xla"
        assert cblas.backend(big, big, flops=1 << 40)[0] == expected
    if not cblas.mkl_unavailable(big):
        with cblas.forced("mkl"):
            assert cblas.backend(big, big, flops=1 << 40)[0] == "mkl"  # measured slower, but asked for
    base = {"flops": 1e9, "time": "t"}
    assert mkl_calibration.verdict({**base, "mkl_s": 1.0, "xla_s": 1.2})[0]
    assert not mkl_calibration.verdict({**base, "mkl_s": 1.0, "xla_s": 1.02})[0]  # a tie goes to XLA
    slower = mkl_calibration.verdict({**base, "mkl_s": 2.0, "xla_s": 1.0})
    assert not slower[0] and "MKL sgemm 0 vs XLA dot 1 GFLOP/s" in slower[1]
    monkeypatch.setenv(mkl_calibration.ENV, "yes")
    with pytest.raises(UserError, match="CFM_JAX_MKL_PAYS='yes' is not allowed; use 1"):
        mkl_calibration.mkl_pays()


@needs_mkl
def test_the_measurement_runs_once_and_is_cached(monkeypatch, tmp_path):
    """A fresh cache measures in a subprocess and writes the file; the next lookup reads it."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv(mkl_calibration.ENV, raising=False)
    mkl_calibration.measured.cache_clear()
    try:
        pays, why = mkl_calibration.mkl_pays()
        result = json.loads(mkl_calibration.cache_path().read_text())
        assert result["mkl_s"] > 0 and result["xla_s"] > 0 and why == mkl_calibration.verdict(result)[1]
        assert pays == (result["mkl_s"] * mkl_calibration.MARGIN <= result["xla_s"])
        mkl_calibration.measured.cache_clear()
        monkeypatch.setattr(mkl_calibration.subprocess, "run", lambda *a, **k: pytest.fail("measured twice"))
        assert mkl_calibration.mkl_pays() == (pays, why)
    finally:
        mkl_calibration.measured.cache_clear()  # the other tests see the real cache again
