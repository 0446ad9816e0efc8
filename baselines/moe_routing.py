"""MoE routing: expert selection (top-k, top-p), the balancing losses and the routing statistics.

Pure functions on float32 router logits; the `moe` module (baselines/moe.py) wires them together.
Shapes: N tokens, E routed experts, K selection slots per token (top_k, or max_k under top-p).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from cfm_jax.layers.activation_stats import UNION_CHUNKS

# Per-expert loads are logged one scalar each (load_e0, load_e1, ...) up to this many experts.
MAX_PER_EXPERT_STATS = 16


class Routing(NamedTuple):
    experts: jax.Array  # (N, K) int32 chosen experts, slot 0 = highest selection score
    weights: jax.Array  # (N, K) float32 combine weights, 0 on unused slots
    valid: jax.Array  # (N, K) bool: slot in use (under top-p the number of used slots varies)
    probs: jax.Array  # (N, E) float32 router probabilities (scores normalized to sum to 1)


def route(
    logits: jax.Array,
    bias: jax.Array | None,
    *,
    score: str,
    mode: str,
    k: int,
    top_p: float,
    renormalize: bool,
) -> Routing:
    """logits: (N, E) float32; bias: (E,) selection bias (loss-free balancing) or None.

    Experts are chosen by score + bias (the bias steers selection only, it never enters a weight).
    mode "topk" uses k slots; mode "topp" orders up to k (= max_k) experts by selection score and
    keeps them while the probability mass of the ones before is < top_p, so at least one is used.
    Weights are the raw scores of the chosen experts (Switch), or those divided by their sum
    (`renormalize`; for softmax scores this is the softmax over the chosen logits, Mixtral).
    """
    scores = jax.nn.softmax(logits, axis=-1) if score == "softmax" else jax.nn.sigmoid(logits)
    probs = scores / jnp.sum(scores, axis=-1, keepdims=True)  # sigmoid scores don't sum to 1
    select = scores if bias is None else scores + jax.lax.stop_gradient(bias)
    _, experts = jax.lax.top_k(jax.lax.stop_gradient(select), k)  # (N, K) descending
    chosen = jnp.take_along_axis(scores, experts, axis=-1)
    if mode == "topp":
        mass = jnp.take_along_axis(jax.lax.stop_gradient(probs), experts, axis=-1)
        valid = (jnp.cumsum(mass, axis=-1) - mass) < top_p  # mass before this slot
    else:
        valid = jnp.ones(experts.shape, bool)
    weights = jnp.where(valid, chosen, 0.0)
    if renormalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return Routing(experts.astype(jnp.int32), weights, valid, probs)


def expert_load(routing: Routing, n_experts: int) -> jax.Array:
    """(E,) float32: number of token-slots routed to each expert (before any capacity drop)."""
    return jnp.sum(_slot_mask(routing.experts, routing.valid, n_experts), axis=(0, 1))


def _slot_mask(experts: jax.Array, mask: jax.Array, n_experts: int) -> jax.Array:
    """(N, K, E) float32: 1 where slot k of token n picked expert e and is in `mask`. Written as a
    compare (not bincount's scatter) so that it fuses into the reduction that follows and works on
    batch-sharded arrays."""
    return ((experts[..., None] == jnp.arange(n_experts)) & mask[..., None]).astype(jnp.float32)


def switch_aux_loss(load: jax.Array, probs: jax.Array) -> jax.Array:
    """E * sum_e f_e P_e, f_e = load share (sums to 1), P_e = mean router probability.

    Equals 1 under perfectly uniform routing (MaxText's and Flaxformer's forms are k times this).
    Gradient reaches the router through P only (f is a count).
    """
    n_experts = load.shape[0]
    f = load / jnp.maximum(jnp.sum(load), 1.0)
    return n_experts * jnp.sum(f * jnp.mean(probs, axis=0))


def router_z_loss(logits: jax.Array) -> jax.Array:
    """ST-MoE: mean over tokens of logsumexp(logits)^2."""
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) ** 2)


def bias_update(bias: jax.Array, load: jax.Array, rate: float) -> jax.Array:
    """Loss-free balancing (Wang et al. 2024): b_e += u * sign(mean(load) - load_e)."""
    return bias + rate * jnp.sign(jnp.mean(load) - load)


def routing_stats(
    routing: Routing,
    kept: jax.Array,
    load: jax.Array,
    *,
    seq: int,
    n_shared: int,
    params_per_expert: int,
    router_params: int,
) -> dict[str, jax.Array]:
    """Scalar statistics of one layer's routing. kept: (N, K) bool, slots actually computed; the N
    tokens are sequences of `seq`.

    load_*: from the routed (pre-drop) load c_e; experts_per_token_*: routed experts computed per
    token (after capacity drops, shared experts not counted); activation_ratio: computed expert
    neurons / all expert neurons, shared experts included in both; union_ratio_*: the same for the
    neurons used by ANY token of a chunk (as for neuron-sparse FFNs, layers/activation_stats.py).
    """
    n_experts = load.shape[0]
    mean_load = jnp.maximum(jnp.mean(load), 1e-9)
    used = jnp.sum(kept, axis=-1)  # (N,) routed experts computed per token
    k_max = kept.shape[-1]
    # Quantiles from the histogram of `used` (an integer in [0, K]), exact and cheap.
    histogram = jnp.sum((used[:, None] == jnp.arange(k_max + 1)).astype(jnp.float32), axis=0)
    cdf = jnp.cumsum(histogram) / used.shape[0]
    quantile = lambda q: jnp.argmax(cdf >= q).astype(jnp.float32)
    entropy = -jnp.sum(routing.probs * jnp.log(jnp.maximum(routing.probs, 1e-30)), axis=-1)
    mean_used = jnp.mean(used.astype(jnp.float32))
    active = router_params + (mean_used + n_shared) * params_per_expert
    stats = {
        "load_cv": jnp.std(load) / mean_load,
        "load_maxvio": jnp.max(load) / mean_load - 1.0,
        "dropped_fraction": 1.0 - jnp.sum(kept) / jnp.maximum(jnp.sum(routing.valid), 1),
        "router_entropy": jnp.mean(entropy) / math.log(n_experts),
        "experts_per_token_mean": mean_used,
        "experts_per_token_p50": quantile(0.5),
        "experts_per_token_p90": quantile(0.9),
        "experts_per_token_max": jnp.max(used).astype(jnp.float32),
        "activation_ratio": (mean_used + n_shared) / (n_experts + n_shared),
        "active_params_per_token": active,
        "flops_per_token": 2.0 * active,
    }
    # (batch, seq, E): expert computed for the token
    used_experts = jnp.any(_slot_mask(routing.experts, kept, n_experts) > 0, axis=1).reshape(-1, seq, n_experts)
    union = lambda mask: (jnp.mean(mask.astype(jnp.float32)) * n_experts + n_shared) / (n_experts + n_shared)
    stats["union_ratio_batch"] = union(jnp.any(used_experts, axis=(0, 1)))
    for chunk in UNION_CHUNKS:
        c = min(chunk, seq)
        chunks = used_experts[:, : seq // c * c].reshape(used_experts.shape[0], seq // c, c, n_experts)
        stats[f"union_ratio_{chunk}"] = union(jnp.any(chunks, axis=2))
    if n_experts <= MAX_PER_EXPERT_STATS:
        share = load / jnp.maximum(jnp.sum(load), 1.0)
        stats.update({f"load_e{e}": share[e] for e in range(n_experts)})
    return stats
