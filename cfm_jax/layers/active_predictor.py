"""A low-rank predictor of which neurons of a ReLU-family FFN fire for a token (Deja Vu-style), so a
batch-1 sparse FFN can skip the selector matrix's inactive columns too, not only W_down's rows.

The exact gather path (`sparse_decode.gather_ffn_step`) must compute s = x W_sel in full to learn
which neurons fire, which bounds its speedup below 2x (3x gated). The predictor estimates s from a
rank-r code of x instead, at (d + f) r multiply-adds instead of d f:

    p = (proj_rows @ x) @ lift                  (f,) estimated selector pre-activations
    candidates = {i : p[i] > cut[i]}            cut[i] = threshold - margin * sigma[i]

and the sparse FFN then computes the exact pre-activation of the candidates only, keeping those that
pass the threshold (`predicted_ffn_reference`; `cfm_jax.kernels.active_rows` reads their rows in
place). Candidates that do not fire cost time but no accuracy; firing neurons the predictor misses
are dropped, so the output is approximate: `evaluate` reports recall and the output error.

Fitting (`fit_predictor`) needs no training loop: on sample inputs X (N, d), the best rank-r linear
estimate of S = X W_sel in squared error is S V V^T, with V (f, r) the top right singular vectors of
S (reduced-rank regression), so proj_rows = (W_sel V)^T and lift = V^T. sigma[i] is the residual
std of neuron i on the samples, and the margin is the smallest that reaches the requested recall on
them (to float rounding). It only works where the inputs have low-rank structure (a trained model's residual stream); on
random inputs and weights nothing is predictable and recall collapses (tested).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from cfm_jax.errors import UserError


class LowRankPredictor(NamedTuple):
    """proj_rows: (r, d); lift: (r, f); cut: (f,). Neuron i is predicted to fire for x (d,) iff
    ((proj_rows @ x) @ lift)[i] > cut[i]. The layouts the in-place kernel reads: a row of proj_rows per
    code entry, then p accumulated as code[k] * lift[k] (no horizontal sums)."""

    proj_rows: np.ndarray
    lift: np.ndarray
    cut: np.ndarray


def predicted_scores(pred: LowRankPredictor, x):
    """x: (..., d) -> estimated selector pre-activations (..., f)."""
    return (x @ pred.proj_rows.T) @ pred.lift


def fit_predictor(inputs, selector, threshold: float, rank: int, recall: float = 0.999) -> LowRankPredictor:
    """Fit on sample FFN inputs (N, d) for the selector matrix (d, f) (W_up for relu, W_gate for the
    gated forms) and FATReLU threshold. recall: the fraction of the samples' firing neurons the
    predictor must flag, which sets the margin (more recall, more candidates)."""
    x = np.asarray(inputs, np.float64)
    w = np.asarray(selector, np.float64)
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[0]:
        raise UserError(f"fit_predictor takes inputs (N, d) and selector (d, f), got {x.shape} and {w.shape}")
    most = min(x.shape[0], *w.shape)  # S = X W has at most this rank
    if not 1 <= rank <= most:
        raise UserError(f"predictor rank={rank} must be in [1, min(samples, d_model, d_ff)] = [1, {most}]")
    if not 0 < recall <= 1:
        raise UserError(f"predictor recall={recall} must be in (0, 1]")
    s = x @ w  # (N, f)
    # S's right singular vectors are those of R W, with X = Q R (R: (d, d)): a smaller SVD when N > d.
    small = np.linalg.qr(x, mode="r") @ w if x.shape[0] > x.shape[1] else s
    v = np.linalg.svd(small, full_matrices=False)[2][:rank].T  # (f, r)
    sigma = (s - (s @ v) @ v.T).std(axis=0)  # (f,) residual std per neuron
    pred = LowRankPredictor((w @ v).T.astype(np.float32), v.T.astype(np.float32), np.zeros(w.shape[1], np.float32))
    p = predicted_scores(pred, x.astype(np.float32))
    fires = s > threshold
    if not fires.any():
        raise UserError(f"no neuron fires on the {x.shape[0]} samples at threshold {threshold}: nothing to predict")
    # Firing neuron i of sample n is flagged iff its margin exceeds need = (threshold - p) / sigma:
    # the margin is the `recall` quantile of the needs of all firing (sample, neuron) pairs.
    need = ((threshold - p) / np.maximum(sigma, 1e-12))[fires]
    margin = max(float(np.quantile(need, recall, method="higher")), 0.0) * (1 + 1e-6) + 1e-6
    return pred._replace(cut=(threshold - margin * sigma).astype(np.float32))


def predicted_ffn_reference(x: jax.Array, pred: LowRankPredictor, up_rows: jax.Array, down: jax.Array,
                            threshold: float) -> jax.Array:
    """A FATReLU FFN over the predicted neurons only, in plain JAX (every row read; the semantics the
    in-place kernel must match). x: (d,); up_rows: (f, d) (W_up transposed); down: (f, d) -> (d,)."""
    candidates = predicted_scores(pred, x) > pred.cut
    s = up_rows @ x
    return jnp.where(candidates & (s > threshold), s, 0.0) @ down


def evaluate(pred: LowRankPredictor, inputs, up, down, threshold: float) -> dict:
    """Quality on held-out inputs (N, d) for a FATReLU FFN with W_up (d, f), W_down (f, d):
    recall (firing neurons flagged / firing), candidates per firing neuron, mean candidate and firing
    counts per token, and the output error ||y_pred - y|| / ||y|| over all tokens."""
    x = np.asarray(inputs, np.float32)
    s = x @ np.asarray(up, np.float32)
    fires = s > threshold
    candidates = predicted_scores(pred, x) > pred.cut
    y = np.where(fires, s, 0) @ np.asarray(down, np.float32)
    y_pred = np.where(fires & candidates, s, 0) @ np.asarray(down, np.float32)
    n_fire = max(int(fires.sum()), 1)
    return {"recall": float((fires & candidates).sum() / n_fire), "candidates_per_firing": float(candidates.sum() / n_fire),
            "candidates_per_token": float(candidates.sum(1).mean()), "firing_per_token": float(fires.sum(1).mean()),
            "output_error": float(np.linalg.norm(y_pred - y) / max(np.linalg.norm(y), 1e-30))}


def ffn_inputs(model, tokens, layer: int) -> jax.Array:
    """The inputs of `model.blocks[layer].ffn` (after its RMSNorm) for tokens (batch, seq): (batch*seq, d).
    Collect them from representative text to fit a predictor for that layer."""
    h = model.embed(jnp.asarray(tokens))
    for block in model.blocks[:layer]:
        h, _ = block(h)
    block = model.blocks[layer]
    h = h + block.mixer(block.mixer_norm(h))[0]
    return block.ffn_norm(h).reshape(-1, h.shape[-1])
