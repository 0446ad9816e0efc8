"""Batch-1 sparse inference for `neuron_sparse` FFNs: read only the active neurons' weights.

At decode time (one token), compute the selector matrix in full (W_u for relu/relu2, W_g for the
gated forms) to learn which neurons are active, then gather only those neurons' rows of the other
matrices. JAX shapes are static, so the gather has a fixed budget K (e.g. the 99th percentile of
observed active counts, `choose_budget`). When a token has more than K active neurons ("overflow"):

- overflow="dense": fall back to the full dense computation for that token (exact; `lax.cond`);
- overflow="truncate": keep the K neurons with the largest selector values (approximate).

Either way the overflow is returned so callers can count it. Without overflow the result equals
the dense FFN (`NeuronSparseFFN.__call__`) up to float rounding; tests check this.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from cfm_jax.errors import UserError
from cfm_jax.layers.neuron_sparse import GATED, NeuronSparseFFN, fat_relu


class GatherWeights(NamedTuple):
    """Weights laid out for row gathers. selector: (d, f); up_rows: (f, d) or None; down_rows: (f, d)."""

    selector: jax.Array
    up_rows: jax.Array | None
    down_rows: jax.Array


def prepare(ffn: NeuronSparseFFN) -> GatherWeights:
    if ffn.cfg.top_k and ffn.cfg.activation in GATED:
        raise UserError("the gather path supports top_k only for non-gated activations (relu, relu2)")
    if ffn.gate is None:
        return GatherWeights(ffn.up.kernel[...], None, ffn.down.kernel[...])
    return GatherWeights(ffn.gate.kernel[...], ffn.up.kernel[...].T, ffn.down.kernel[...])


def _activate(activation: str, t: float, s: jax.Array, u: jax.Array | None) -> jax.Array:
    """Activation from selector pre-activations s and (gated forms) up pre-activations u."""
    if activation == "relu":
        return fat_relu(s, t)
    if activation == "relu2":
        return fat_relu(s, t) ** 2
    if activation == "reglu":
        return fat_relu(s, t) * u
    if activation == "relu2_glu":
        return fat_relu(s, t) ** 2 * u
    return fat_relu(s, t) * fat_relu(u, t)  # drelu


def gather_ffn_step(
    ffn: NeuronSparseFFN, weights: GatherWeights, x: jax.Array, budget: int,
    overflow: Literal["dense", "truncate"] = "dense",
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One token. x: (d,) -> (y: (d,), n_active: () int, overflowed: () bool).

    n_active counts neurons whose selector passes the (FAT)ReLU; for drelu that is the candidate
    set (the up-projection may still zero some of them).
    """
    cfg, t = ffn.cfg, ffn.cfg.threshold
    s = x @ weights.selector  # (f,) selector pre-activations, always computed in full
    active = s > t
    n_active = jnp.sum(active)
    k = min(budget, s.shape[0])
    if cfg.top_k:  # fixed-k control: exactly the k largest activations, budget k
        k = cfg.top_k
    _, idx = jax.lax.top_k(jnp.where(active, s, -jnp.inf), k)  # (k,) most active first
    valid = active[idx]

    def sparse(_):
        u = weights.up_rows[idx] @ x if weights.up_rows is not None else None  # (k,)
        a = jnp.where(valid, _activate(cfg.activation, t, s[idx], u), 0.0)
        return a @ weights.down_rows[idx]

    def dense(_):
        u = weights.up_rows @ x if weights.up_rows is not None else None
        return _activate(cfg.activation, t, s, u) @ weights.down_rows

    overflowed = n_active > k
    if cfg.top_k or overflow == "truncate":
        y = sparse(None)
    else:
        y = jax.lax.cond(overflowed, dense, sparse, None)
    return y, n_active, overflowed


def choose_budget(active_counts, percentile: float = 99.0) -> int:
    """Gather budget K from observed per-token active counts (a high percentile, at least 1)."""
    return max(1, int(np.ceil(np.percentile(np.asarray(active_counts), percentile))))
