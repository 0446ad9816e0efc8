"""Sparsity statistics of FFN intermediate activations, shared by every FFN with neurons.

All are scalars over one batch, so they flow through aux["stats"] into metrics.jsonl and eval.json:

- activation_ratio: fraction of (token, neuron) pairs with a nonzero activation (ProSparse).
- active_{mean,p50,p90,p99,max}: distribution over tokens of the number of active neurons.
- union_ratio_{8,64}: fraction of neurons active for ANY token of a chunk of 8 / 64 consecutive
  tokens, averaged over chunks (chunks never span sequences; a chunk longer than the sequence is
  clipped to it). union_ratio_batch: the same over the whole batch.
- top10_share: share of all activations taken by the 10 % most frequently active neurons (1.0 would
  mean all activity in 10 % of neurons; 0.1 means perfectly uniform use).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

UNION_CHUNKS = (8, 64)


def activation_stats(h: jax.Array) -> dict[str, jax.Array]:
    """h: (batch, seq, d_ff) intermediate activations -> {name: scalar}."""
    active = jax.lax.stop_gradient(h) != 0  # (b, s, f)
    b, s, f = active.shape
    counts = jnp.sum(active, axis=-1).reshape(-1).astype(jnp.float32)  # (b*s,)
    stats = {
        "activation_ratio": jnp.mean(active.astype(jnp.float32)),
        "active_mean": jnp.mean(counts),
        "active_p50": jnp.percentile(counts, 50),
        "active_p90": jnp.percentile(counts, 90),
        "active_p99": jnp.percentile(counts, 99),
        "active_max": jnp.max(counts),
        "union_ratio_batch": jnp.mean(jnp.any(active, axis=(0, 1)).astype(jnp.float32)),
    }
    for chunk in UNION_CHUNKS:
        c = min(chunk, s)
        n = s // c  # complete chunks per sequence
        chunks = active[:, : n * c].reshape(b, n, c, f)
        stats[f"union_ratio_{chunk}"] = jnp.mean(jnp.any(chunks, axis=2).astype(jnp.float32))
    frequency = jnp.sum(active, axis=(0, 1)).astype(jnp.float32)  # (f,) activations per neuron
    top = max(1, f // 10)
    stats["top10_share"] = jnp.sum(jax.lax.top_k(frequency, top)[0]) / jnp.maximum(jnp.sum(frequency), 1.0)
    return stats
