"""CETT (Sparsing Law, Luo et al. 2024): activation-function-agnostic sparsity of any FFN.

Neuron i's output is n_i = W_d[i, :] * a_i, with norm |a_i| * ||W_d[i, :]||. For a threshold eps,
the dropped set is D = {i : ||n_i|| < eps} and, per token,

    CETT(eps) = || sum_{i in D} n_i || / || FFN(x) ||.

For a target CETT tau, each layer's eps is binary-searched so that the mean CETT over tokens equals
tau; the sparsity it yields is the fraction of (token, neuron) pairs in D. CETT-PPL-1% is the tau at
which truncating every layer this way raises validation perplexity by 1 %, and the sparsity there.
Because every FFN (SwiGLU included) has neurons in this sense, the number is fair across activations.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from cfm_jax.harness.neurons import down_column_norms, make_capture_forward, make_hooked_forward, mean_loss

PPL_RISE = 0.01  # CETT-PPL-1%
TAU_GRID = (0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5)


def layer_cett(a: np.ndarray, w_down: np.ndarray, col_norms: np.ndarray, eps: float) -> float:
    """Mean over tokens of the CETT at threshold eps. a: (tokens, d_ff), w_down: (d_ff, d_model)."""
    full = np.linalg.norm(a @ w_down, axis=-1)
    dropped = (np.abs(a) * col_norms) < eps
    part = np.linalg.norm((a * dropped) @ w_down, axis=-1)
    ok = full > 0
    return float(np.mean(part[ok] / full[ok])) if ok.any() else 0.0


def threshold_for_cett(a: np.ndarray, w_down: np.ndarray, col_norms: np.ndarray, tau: float, iters: int = 40) -> float:
    """The largest eps whose mean CETT is <= tau (CETT grows with eps; bisection over
    [0, max neuron norm]), so truncation never exceeds the allowed relative error."""
    lo, hi = 0.0, float(np.max(np.abs(a) * col_norms)) * (1 + 1e-6) + 1e-12
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if layer_cett(a, w_down, col_norms, mid) <= tau:
            lo = mid
        else:
            hi = mid
    return lo


def truncate_below(layer: int, a, params):
    """Zero neurons whose output norm |a_i| * ||W_d[i]|| is below the layer's eps."""
    eps, norms = params
    return jnp.where(jnp.abs(a) * norms[layer] < eps[layer], 0.0, a)


def cett_analysis(model, batches: list[dict], max_tokens: int = 4096) -> dict:
    """CETT-PPL-1% and a CETT -> (sparsity, perplexity ratio) curve on the given validation batches."""
    capture = make_capture_forward(model)
    truncated = make_hooked_forward(model, truncate_below)
    norms = down_column_norms(model)
    norms_arr = jnp.asarray(np.stack(norms))
    w_downs = [np.asarray(b.ffn.down.kernel[...]) for b in model.blocks]
    acts = [[] for _ in model.blocks]  # activations of the first max_tokens tokens, per layer
    for batch in batches:
        _, _, captured = capture(jnp.asarray(batch["inputs"]), jnp.asarray(batch["labels"]))
        for layer, a in enumerate(captured):
            acts[layer].append(np.asarray(a).reshape(-1, a.shape[-1]))
        if sum(len(x) for x in acts[0]) >= max_tokens:
            break
    acts = [np.concatenate(x)[:max_tokens] for x in acts]
    base_loss = mean_loss(truncated, batches, (jnp.zeros(len(norms)), norms_arr))  # eps 0: no-op

    def at(tau: float) -> dict:
        eps = [threshold_for_cett(a, w, n, tau) for a, w, n in zip(acts, w_downs, norms)]
        sparsity = float(np.mean([np.mean(np.abs(a) * n < e) for a, n, e in zip(acts, norms, eps)]))
        loss = mean_loss(truncated, batches, (jnp.asarray(eps, jnp.float32), norms_arr))
        return {"cett": tau, "sparsity": sparsity, "ppl_ratio": float(np.exp(loss - base_loss))}

    curve = [at(tau) for tau in TAU_GRID]
    found = _bisect_ppl_rise(at, curve, 1 + PPL_RISE)
    return {
        "cett_ppl1": found["cett"] if found else None,
        "sparsity_at_cett_ppl1": found["sparsity"] if found else None,
        "ppl_ratio_at_cett_ppl1": found["ppl_ratio"] if found else None,
        "note": None if found else f"perplexity stayed within 1% up to CETT {TAU_GRID[-1]}",
        "natural_sparsity": float(np.mean([np.mean(a == 0) for a in acts])),  # exact zeros
        "curve": curve,
        "tokens_for_thresholds": int(len(acts[0])),
    }


def _bisect_ppl_rise(at, curve: list[dict], target: float, iters: int = 6) -> dict | None:
    """The largest tau (to grid/bisection precision) whose perplexity ratio stays <= target."""
    above = [p for p in curve if p["ppl_ratio"] > target]
    if not above:
        return None
    hi = min(above, key=lambda p: p["cett"])
    below = [p for p in curve if p["ppl_ratio"] <= target and p["cett"] < hi["cett"]]
    lo = max(below, key=lambda p: p["cett"]) if below else at(0.0)
    for _ in range(iters):
        mid = at(0.5 * (lo["cett"] + hi["cett"]))
        lo, hi = (mid, hi) if mid["ppl_ratio"] <= target else (lo, mid)
    return lo
