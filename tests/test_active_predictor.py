"""The low-rank active-set predictor (`layers/active_predictor.py`) and the in-place kernel it drives
(`kernels/active_rows.py: predicted_rows_ffn_in_place`)."""

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cfm_jax.errors import UserError
from cfm_jax.layers.active_predictor import (
    LowRankPredictor, evaluate, ffn_inputs, fit_predictor, predicted_ffn_reference, predicted_scores,
)
from cfm_jax.layers.neuron_sparse import fat_relu


def low_rank_inputs(n, d, rank, seed):
    """(n, d) inputs spanned by `rank` directions plus 1 % noise, like a residual stream with structure."""
    rng = np.random.default_rng(seed)
    basis = rng.normal(size=(rank, d))
    return (rng.normal(size=(n, rank)) @ basis + 0.01 * rng.normal(size=(n, d))).astype(np.float32)


def test_fit_reaches_its_recall_on_held_out_low_rank_inputs_with_few_extra_candidates():
    d, f = 96, 384
    x = low_rank_inputs(3000, d, 12, seed=0)
    fit, held_out = x[:2000], x[2000:]
    rng = np.random.default_rng(1)
    up, down = rng.normal(size=(d, f)).astype(np.float32), rng.normal(size=(f, d)).astype(np.float32)
    threshold = float(np.quantile(fit @ up, 0.8))  # ratio 0.2
    pred = fit_predictor(fit, up, threshold, rank=16, recall=0.99)
    assert pred.proj_rows.shape == (16, d) and pred.lift.shape == (16, f) and pred.cut.shape == (f,)
    on_fit = evaluate(pred, fit, up, down, threshold)
    assert on_fit["recall"] >= 0.99 - 1e-3
    q = evaluate(pred, held_out, up, down, threshold)
    assert q["recall"] >= 0.98 and q["candidates_per_firing"] < 1.2 and q["output_error"] < 0.05
    assert abs(q["firing_per_token"] / f - 0.2) < 0.03
    more = fit_predictor(fit, up, threshold, rank=16, recall=0.999)  # more recall: a wider margin
    assert np.all(more.cut <= pred.cut) and evaluate(more, held_out, up, down, threshold)["recall"] >= q["recall"]


def test_fewer_samples_than_dimensions_fit_the_same_way():
    """N <= d: the SVD of S itself instead of the smaller one through X's QR; same subspace, so the
    same scores, whichever path a sample count takes."""
    d, f = 64, 128
    x = low_rank_inputs(64, d, 6, seed=5)
    up = np.random.default_rng(6).normal(size=(d, f)).astype(np.float32)
    t = float(np.quantile(x @ up, 0.7))
    square = fit_predictor(x, up, t, rank=6)  # N == d: S's own SVD
    tall = fit_predictor(np.concatenate([x, x]), up, t, rank=6)  # N > d: through the QR (same rows twice)
    np.testing.assert_allclose(predicted_scores(square, x), predicted_scores(tall, x), rtol=1e-3, atol=1e-3)
    assert evaluate(square, x, up, up.T, t)["recall"] >= 0.999 - 1e-3


def test_unpredictable_inputs_cost_candidates_not_silent_misses():
    """Full-rank random inputs and a rank far below d: the margin needed for the recall flags most
    neurons, so the predictor saves little, and evaluate says so."""
    d, f = 96, 384
    rng = np.random.default_rng(2)
    x = rng.normal(size=(3000, d)).astype(np.float32)
    up, down = rng.normal(size=(d, f)).astype(np.float32), rng.normal(size=(f, d)).astype(np.float32)
    threshold = float(np.quantile(x[:2000] @ up, 0.9))
    pred = fit_predictor(x[:2000], up, threshold, rank=4, recall=0.99)
    q = evaluate(pred, x[2000:], up, down, threshold)
    assert q["recall"] > 0.95 and q["candidates_per_firing"] > 3


def test_evaluate_extremes_and_the_reference_semantics():
    d, f = 24, 40
    rng = np.random.default_rng(3)
    x = rng.normal(size=(50, d)).astype(np.float32)
    up, down = rng.normal(size=(d, f)).astype(np.float32), rng.normal(size=(f, d)).astype(np.float32)
    proj, lift = rng.normal(size=(3, d)).astype(np.float32), rng.normal(size=(3, f)).astype(np.float32)
    every = LowRankPredictor(proj, lift, np.full(f, -np.inf, np.float32))
    none = every._replace(cut=np.full(f, np.inf, np.float32))
    t = 0.3
    perfect = evaluate(every, x, up, down, t)
    assert perfect["recall"] == 1 and perfect["output_error"] == 0 and perfect["candidates_per_token"] == f
    blind = evaluate(none, x, up, down, t)
    assert blind["recall"] == 0 and blind["output_error"] == pytest.approx(1.0)
    dense = fat_relu(jnp.asarray(x[0]) @ up, t) @ down
    np.testing.assert_allclose(predicted_ffn_reference(x[0], every, up.T, down, t), dense, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(predicted_ffn_reference(x[0], none, up.T, down, t), np.zeros(d))
    some = every._replace(cut=np.where(np.arange(f) % 2 == 0, -np.inf, np.inf).astype(np.float32))
    s = x[0] @ up
    expected = np.where((s > t) & (np.arange(f) % 2 == 0), s, 0) @ down
    np.testing.assert_allclose(predicted_ffn_reference(x[0], some, up.T, down, t), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(predicted_scores(every, x), x @ proj.T @ lift, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(rank=0), "rank=0"), (dict(rank=500), "rank=500"), (dict(rank=9), r"rank=9 .*\[1, 8\]"), (dict(recall=0.0), "recall=0.0"),
    (dict(recall=1.5), "recall=1.5"), (dict(threshold=1e9), "no neuron fires"),
])
def test_fit_refuses_bad_settings_in_one_line(kwargs, message):
    rng = np.random.default_rng(4)
    args = dict(inputs=rng.normal(size=(64, 8)), selector=rng.normal(size=(8, 32)), threshold=0.0, rank=4, recall=0.9)
    with pytest.raises(UserError, match=message) as e:
        fit_predictor(**{**args, **kwargs})
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="inputs"):
        fit_predictor(rng.normal(size=(64, 9)), rng.normal(size=(8, 32)), 0.0, 4)


def _kernel():
    from cfm_jax.kernels import active_rows

    if why := active_rows.available():
        pytest.skip(why)
    return active_rows


@pytest.mark.parametrize("d,f,r,keep", [(40, 96, 8, 0.3), (64, 256, 16, 0.05), (17, 33, 5, 1.0), (33, 70, 19, 0.0),
                                        (24, 2048, 8, 0.25)])  # the last: 16 chunks of neurons
def test_in_place_predicted_rows_match_the_reference(d, f, r, keep):
    """Kernel == plain-JAX reference, with d and r not multiples of the 16-lane vectors, an odd f,
    every neuron a candidate, and none."""
    kernel = _kernel()
    ks = jax.random.split(jax.random.key(d), 5)
    x, up_rows, down = (jax.random.normal(ks[0], (d,)), jax.random.normal(ks[1], (f, d)),
                        jax.random.normal(ks[2], (f, d)))
    pred = LowRankPredictor(jax.random.normal(ks[3], (r, d)), jax.random.normal(ks[4], (r, f)), jnp.zeros(f))
    scores = np.asarray(predicted_scores(pred, x))
    cut = np.quantile(scores, 1 - keep) - 1e-3 if keep > 0 else np.inf
    pred = pred._replace(cut=jnp.full((f,), cut, jnp.float32))
    pre = np.sort(np.asarray(up_rows @ x))
    threshold = float(pre[f // 2] + pre[f // 2 + 1]) / 2  # halfway between two values: no ties to round
    got = kernel.predicted_rows_ffn_in_place(x, pred, up_rows, down, threshold)
    np.testing.assert_allclose(got, predicted_ffn_reference(x, pred, up_rows, down, threshold), rtol=1e-5, atol=1e-4)
    if keep == 1.0:  # every neuron a candidate: the dense FATReLU FFN
        np.testing.assert_allclose(got, fat_relu(up_rows @ x, threshold) @ down, rtol=1e-5, atol=1e-4)
    if keep == 0.0:
        np.testing.assert_array_equal(got, np.zeros(d, np.float32))


def test_in_place_kernel_under_jit_scan_and_concurrent_callers():
    """Inside a jitted lax.map (as the benchmark times it), and from two Python threads at once (calls
    share XLA's thread pool; a call runs the chunks no pool thread has taken itself): same results."""
    kernel = _kernel()
    d, f, r = 48, 160, 8
    ks = jax.random.split(jax.random.key(7), 5)
    xs, up_rows, down = (jax.random.normal(ks[0], (6, d)), jax.random.normal(ks[1], (f, d)),
                         jax.random.normal(ks[2], (f, d)))
    pred = LowRankPredictor(jax.random.normal(ks[3], (r, d)), jax.random.normal(ks[4], (r, f)), jnp.zeros(f))
    mapped = jax.jit(lambda xs: jax.lax.map(lambda x: kernel.predicted_rows_ffn_in_place(x, pred, up_rows, down, 0.5), xs))
    expected = np.stack([predicted_ffn_reference(x, pred, up_rows, down, 0.5) for x in xs])
    np.testing.assert_allclose(mapped(xs), expected, rtol=1e-5, atol=1e-4)
    results, errors = [], []

    def worker():
        try:
            for _ in range(20):
                results.append(np.asarray(mapped(xs)))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors and len(results) == 40
    for got in results:
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)


def test_in_place_kernel_refuses_misshapen_predictors():
    kernel = _kernel()
    d, f = 16, 32
    x, rows = jnp.ones(d), jnp.ones((f, d))
    bad = LowRankPredictor(jnp.ones((4, d + 1)), jnp.ones((4, f)), jnp.zeros(f))
    with pytest.raises(ValueError, match="predictor shapes"):
        kernel.predicted_rows_ffn_in_place(x, bad, rows, rows, 0.0)
    with pytest.raises(ValueError, match="predictor shapes"):
        kernel.predicted_rows_ffn_in_place(x, bad._replace(proj_rows=jnp.ones((4, d)), cut=jnp.zeros(f - 1)), rows, rows, 0.0)


def test_ffn_inputs_are_what_the_model_feeds_its_ffn():
    """hidden(ffn_inputs(...)) == the activations the model's own forward pass hands its neuron hook."""
    from cfm_jax.config import resolve
    from cfm_jax.layers.model import build_model

    cfg = resolve("smoke", ["model.ffn=neuron_sparse", "model.d_model=32"])
    model = build_model(cfg.model, 256, seed=0)
    model.eval()
    tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 256)
    seen = {}

    def hook(layer, ffn, a):
        seen[layer] = a
        return a

    model(tokens, neuron_hook=hook)
    for layer in range(cfg.model.n_layers):
        a = model.blocks[layer].ffn.hidden(ffn_inputs(model, tokens, layer))
        np.testing.assert_allclose(a, seen[layer].reshape(-1, a.shape[-1]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("module", ["active_rows", "flash_attention", "selective_scan"])
def test_kernels_build_wherever_a_compiler_exists(module):
    """The kernel tests skip where a kernel cannot run; a compile error in our own source must not
    pass for that: on CPU with a C++ compiler every kernel builds."""
    import importlib

    from cfm_jax.kernels import build

    if jax.default_backend() != "cpu" or build.compiler() is None:
        pytest.skip("no CPU backend or no C++ compiler here")
    assert importlib.import_module(f"cfm_jax.kernels.{module}").available() is None


def test_in_place_given_rows_over_many_chunks_with_padding():
    """cfm_active_rows with lists long enough to be cut into 16 chunks, -1 padding and stray indices
    inside: equals the dense FATReLU FFN over the listed neurons, bit-identically on repeated calls."""
    kernel = _kernel()
    from cfm_jax.bench import active_rows_ffn

    d, f = 33, 3000
    ks = jax.random.split(jax.random.key(11), 3)
    x, up_rows, down = (jax.random.normal(ks[0], (d,)), jax.random.normal(ks[1], (f, d)),
                        jax.random.normal(ks[2], (f, d)))
    active = np.flatnonzero(np.asarray(up_rows @ x) > 0.3)
    assert len(active) > 16 * 32
    listed = np.concatenate([active[:300], [-1, f + 5, -7], active[300:], np.full(40, -1)]).astype(np.int32)
    got = kernel.active_rows_ffn_in_place(x, up_rows, down, jnp.asarray(listed), 0.3)
    expected = active_rows_ffn(x, up_rows, down, jnp.asarray(active), 0.3)
    # ~1500 float32 terms summed in another order: rounding grows with the partial sums' size (~400 here)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * float(np.abs(expected).max()))
    for _ in range(5):
        np.testing.assert_array_equal(kernel.active_rows_ffn_in_place(x, up_rows, down, jnp.asarray(listed), 0.3), got)
