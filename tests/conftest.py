"""Shared test helpers. Tests run on the CPU with tiny shapes."""

from __future__ import annotations

import jax

jax.config.update("jax_default_matmul_precision", "highest")  # exact fp32 matmuls for parity tests
