"""Density fit: recovers a known power law, inverts it, and reports failure instead of a bad fit."""

from __future__ import annotations

import numpy as np
import pytest

from cfm_jax.harness.density import bootstrap_densities, density, effective_params, fit_loss_curve


def test_fit_recovers_a_known_power_law_and_inverts_it():
    n = np.array([1e5, 3e5, 1e6, 3e6, 1e7])
    loss = 40.0 * n**-0.3 + 1.5
    fit = fit_loss_curve(n, loss)
    assert fit["ok"] and fit["alpha"] == pytest.approx(0.3, abs=0.01) and fit["l_inf"] == pytest.approx(1.5, abs=0.02)
    assert effective_params(fit, 40.0 * 2e6**-0.3 + 1.5) == pytest.approx(2e6, rel=0.05)
    # A model reaching the loss of a 2M reference with 1M parameters has density ~2.
    assert density(fit, 40.0 * 2e6**-0.3 + 1.5, 1e6) == pytest.approx(2.0, rel=0.05)
    assert density(fit, 1.0, 1e6) is None  # below L_inf: not invertible


def test_failed_fits_are_reported():
    assert not fit_loss_curve([1e5, 1e6], [3.0, 2.5])["ok"]  # too few points
    bad = fit_loss_curve([1e5, 3e5, 1e6, 3e6], [2.0, 3.0, 1.9, 3.1])  # loss does not fall with N
    assert not bad["ok"] and bad["reason"]
    assert density(bad, 2.0, 1e6) is None


def test_bootstrap_intervals_cover_the_truth_and_widen_with_seed_noise():
    """Reference losses on a known curve plus per-seed noise; a model worth 2x its size (density 2)
    and the reference's own middle row (density near 1). The model's intervals contain the truth,
    the noisier setting gives wider intervals, and one seed gives no interval."""
    n = np.array([1e5, 3e5, 1e6, 3e6, 1e7])
    curve = lambda m: 40.0 * m**-0.3 + 1.5
    rng = np.random.default_rng(0)
    widths = []
    for noise in (0.002, 0.02):
        seed_shift = noise * rng.standard_normal(5)  # a seed's data order shifts every model alike
        ref = curve(n)[:, None] + seed_shift[None, :] + 0.2 * noise * rng.standard_normal((5, 5))
        model = curve(2e6) + seed_shift + 0.2 * noise * rng.standard_normal(5)
        out = bootstrap_densities(n, ref, {"x2": (model, 1e6), "ref_mid": (ref[2], 1e6)}, reps=300)
        lo, hi = out["x2"]["ci"]
        assert lo <= 2.0 <= hi and out["x2"]["density"] == pytest.approx(2.0, rel=0.1)
        assert out["ref_mid"]["density"] == pytest.approx(1.0, abs=0.1)  # off 1 by its own residual only
        widths.append(hi - lo)
    assert widths[1] > 2 * widths[0]
    one = bootstrap_densities(n, curve(n)[:, None], {"x2": (np.array([curve(2e6)]), 1e6)})
    assert one["x2"]["ci"] is None and one["x2"]["density"] == pytest.approx(2.0, rel=0.05)
