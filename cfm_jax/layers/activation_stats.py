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
    """h: (batch, seq, d_ff) intermediate activations -> {name: scalar}.

    Three passes over h, every statistic derived from them: active neurons per token (b, s), tokens
    per neuron (f,) and the union over chunks of 8 tokens (b, s/8, f); the step pays for these in
    every layer (counting straight from the (b, s, f) mask for each statistic took ~2x the time)."""
    active = jax.lax.stop_gradient(h) != 0  # (b, s, f)
    b, s, f = active.shape
    counts = jnp.sum(active, axis=-1, dtype=jnp.int32).reshape(-1).astype(jnp.float32)  # (b*s,)
    frequency = jnp.sum(active, axis=(0, 1), dtype=jnp.int32).astype(jnp.float32)  # (f,) tokens per neuron
    stats = {
        "activation_ratio": jnp.sum(counts) / (b * s * f),
        "active_mean": jnp.mean(counts),
        "active_p50": jnp.percentile(counts, 50),
        "active_p90": jnp.percentile(counts, 90),
        "active_p99": jnp.percentile(counts, 99),
        "active_max": jnp.max(counts),
        "union_ratio_batch": jnp.mean((frequency > 0).astype(jnp.float32)),
    }
    unions = {}  # chunk length -> (b, complete chunks, f) union over each chunk
    for chunk in UNION_CHUNKS:
        c = min(chunk, s)
        n = s // c  # complete chunks per sequence
        finer = next((size for size in unions if c % size == 0), None)
        if finer is not None:  # a union of whole finer chunks (c // finer each): no pass over the mask
            per = c // finer
            unions[c] = jnp.any(unions[finer][:, : n * per].reshape(b, n, per, f), axis=2)
        else:
            unions[c] = jnp.any(active[:, : n * c].reshape(b, n, c, f), axis=2)
        stats[f"union_ratio_{chunk}"] = jnp.mean(unions[c].astype(jnp.float32))
    top = max(1, f // 10)
    stats["top10_share"] = jnp.sum(jax.lax.top_k(frequency, top)[0]) / jnp.maximum(jnp.sum(frequency), 1.0)
    return stats
