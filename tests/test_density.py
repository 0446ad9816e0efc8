"""Density fit: recovers a known power law, inverts it, and reports failure instead of a bad fit."""

from __future__ import annotations

import numpy as np
import pytest

from cfm_jax.harness.density import density, effective_params, fit_loss_curve


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
