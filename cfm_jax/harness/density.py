"""Density (Densing Law, Xiao et al. 2024): how many reference-model parameters a model is worth.

Fit L(N) = a * N^-alpha + L_inf on a family of dense reference models trained at the same token
budget, then for any model with loss L invert: N_hat = (a / (L - L_inf))^(1/alpha), and
density = N_hat / N, reported with N = total parameters and with N = active parameters per token.

The fit is a grid over alpha with (a, L_inf) by linear least squares at each alpha (the model is
linear in a and L_inf for fixed alpha; all alphas solved at once). It is reported as failed, not silently used, when it has
fewer points than parameters, a non-positive a or alpha at the grid edge, or a relative RMS residual
above `MAX_RESIDUAL`. A loss at or below L_inf cannot be inverted (density reported as None).
"""

from __future__ import annotations

import numpy as np

MAX_RESIDUAL = 0.02  # relative RMS residual above which the fit is called failed
ALPHAS = np.linspace(0.02, 2.0, 397)


def fit_loss_curve(n_params, losses) -> dict:
    """{"a", "alpha", "l_inf", "rel_rms_residual", "ok", "reason"} for L(N) = a N^-alpha + L_inf."""
    n, y = np.asarray(n_params, np.float64), np.asarray(losses, np.float64)
    if len(n) < 3:
        return {"ok": False, "reason": f"needs >= 3 reference models, got {len(n)}"}
    # Least squares in (a, L_inf) at every alpha of the grid at once: simple regression on x = N^-alpha.
    x = n[None, :] ** -ALPHAS[:, None]  # (alphas, points)
    xc = x - x.mean(axis=1, keepdims=True)
    slope = (xc @ (y - y.mean())) / np.sum(xc**2, axis=1)
    intercept = y.mean() - slope * x.mean(axis=1)
    rms_all = np.sqrt(np.mean((y[None, :] - slope[:, None] * x - intercept[:, None]) ** 2, axis=1))
    i = int(np.argmin(rms_all))
    best = (float(rms_all[i]), float(slope[i]), float(ALPHAS[i]), float(intercept[i]))
    rms, a, alpha, l_inf = best
    rel = rms / float(np.mean(np.abs(y)))
    out = {"a": a, "alpha": alpha, "l_inf": l_inf, "rel_rms_residual": rel, "points": int(len(n))}
    reason = None
    if a <= 0:
        reason = "a <= 0: loss does not fall with parameters in the reference family"
    elif alpha in (ALPHAS[0], ALPHAS[-1]):
        reason = f"alpha at the edge of the search grid ({alpha:.2f})"
    elif rel > MAX_RESIDUAL:
        reason = f"relative RMS residual {rel:.3f} > {MAX_RESIDUAL}"
    return {**out, "ok": reason is None, "reason": reason}


def effective_params(fit: dict, loss: float) -> float | None:
    """N_hat: the reference parameter count that reaches `loss` (None if the fit failed or
    loss <= L_inf)."""
    if not fit.get("ok") or loss <= fit["l_inf"]:
        return None
    return float((fit["a"] / (loss - fit["l_inf"])) ** (1 / fit["alpha"]))


def density(fit: dict, loss: float, n_params: float) -> float | None:
    n_hat = effective_params(fit, loss)
    return None if n_hat is None else n_hat / n_params


def bootstrap_densities(ref_sizes, ref_losses, models: dict, reps: int = 1000, seed: int = 0) -> dict:
    """Densities with 95 % bootstrap intervals over seeds, for several models against one reference.

    ref_sizes: (R,) reference parameter counts; ref_losses: (R, S) their losses per seed; models:
    {name: (losses (S,), N)} (seed j of every row saw the same data order). Each replicate resamples
    the S seeds with replacement (one draw for every row, as seeds pair), refits the reference curve on
    the resampled means and inverts each model's resampled mean. Returns {name: {"density", "ci":
    (lo, hi) or None, "failed"}}: `failed` counts replicates whose fit failed or whose loss was at or
    below L_inf; the interval needs >= 2 seeds and is None when over 5 % of replicates fail.
    """
    ref_losses = np.asarray(ref_losses, np.float64)
    models = {k: (np.asarray(v, np.float64), n) for k, (v, n) in models.items()}
    fit = fit_loss_curve(ref_sizes, ref_losses.mean(axis=1))
    out = {k: {"density": density(fit, float(v.mean()), n), "ci": None, "failed": 0} for k, (v, n) in models.items()}
    s = ref_losses.shape[1]
    if s < 2:
        return out
    rng = np.random.default_rng(seed)
    draws = {k: [] for k in models}
    for _ in range(reps):
        idx = rng.integers(0, s, s)
        fit = fit_loss_curve(ref_sizes, ref_losses[:, idx].mean(axis=1))
        for k, (v, n) in models.items():
            d = density(fit, float(v[idx].mean()), n)
            if d is None:
                out[k]["failed"] += 1
            else:
                draws[k].append(d)
    for k, entry in out.items():
        if entry["failed"] <= 0.05 * reps:
            entry["ci"] = tuple(float(q) for q in np.quantile(draws[k], [0.025, 0.975]))
    return out
