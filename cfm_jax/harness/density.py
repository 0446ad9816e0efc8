"""Density (Densing Law, Xiao et al. 2024): how many reference-model parameters a model is worth.

Fit L(N) = a * N^-alpha + L_inf on a family of dense reference models trained at the same token
budget, then for any model with loss L invert: N_hat = (a / (L - L_inf))^(1/alpha), and
density = N_hat / N, reported with N = total parameters and with N = active parameters per token.

The fit is a grid over alpha with (a, L_inf) by linear least squares at each alpha (the model is
linear in a and L_inf for fixed alpha). It is reported as failed, not silently used, when it has
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
    best = None
    for alpha in ALPHAS:
        design = np.stack([n**-alpha, np.ones_like(n)], axis=1)
        (a, l_inf), *_ = np.linalg.lstsq(design, y, rcond=None)
        resid = y - design @ np.array([a, l_inf])
        rms = float(np.sqrt(np.mean(resid**2)))
        if best is None or rms < best[0]:
            best = (rms, float(a), float(alpha), float(l_inf))
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
