"""Shared plumbing for the neuron analyses (CETT, dynamic activation, bricks).

They all run the model with a `neuron_hook` that reads or rewrites each FFN's intermediate
activations a: (batch, seq, d_ff). For MoE, the bricks analysis runs at expert granularity: the hook
sees the per-expert combine weights (batch, seq, n_experts) instead. Other FFNs are skipped.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cfm_jax.data import IGNORE
from cfm_jax.layers.contracts import ExpertFFN, NeuronFFN


def has_neurons(model) -> bool:
    return all(isinstance(b.ffn, NeuronFFN) for b in model.blocks)


def has_experts(model) -> bool:
    """An FFN whose per-expert combine weights a neuron_hook can read and rewrite (MoE)."""
    return all(isinstance(b.ffn, ExpertFFN) for b in model.blocks)


def analysis_units(model) -> tuple[str, int]:
    """The unit the hooks see and how many per layer: ("neuron", d_ff) or ("expert", n_experts)."""
    if has_neurons(model):
        return "neuron", model.blocks[0].ffn.down.kernel.shape[0]
    if has_experts(model):
        return "expert", model.blocks[0].ffn.cfg.n_experts
    raise ValueError("the model's FFN exposes neither neurons (hidden/down) nor experts (expert_forward)")


def down_column_norms(model) -> list[np.ndarray]:
    """Per layer, ||W_d[i, :]|| for every neuron i: (d_ff,). Neuron i's output norm is |a_i| * this."""
    return [np.linalg.norm(np.asarray(b.ffn.down.kernel[...]), axis=1) for b in model.blocks]


def token_losses(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-token cross-entropy (batch, seq) and the scored mask (batch, seq)."""
    mask = labels != IGNORE
    logp = jax.nn.log_softmax(logits, axis=-1)
    ce = -jnp.take_along_axis(logp, jnp.where(mask, labels, 0)[..., None], axis=-1)[..., 0]
    return jnp.where(mask, ce, 0.0), mask


def make_hooked_forward(model, hook):
    """jitted (tokens, labels, params) -> (per-token CE, mask) with each FFN's activations rewritten
    by hook(layer, a, params) -> a'. `params` is any pytree of arrays, so changing it (thresholds,
    masks) does not recompile."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(tokens, labels, params):
        m = nnx.merge(graphdef, state)
        logits, _ = m(tokens, neuron_hook=lambda layer, ffn, a: hook(layer, a, params))
        return token_losses(logits, labels)

    return run


def make_masked_forward(model):
    """make_hooked_forward with params = keep: (n_layers, d_ff) multipliers (1 keeps, 0 prunes)."""
    return make_hooked_forward(model, lambda layer, a, keep: a * keep[layer])


def make_capture_forward(model):
    """jitted tokens, labels -> (per-token CE, mask, [a per layer: (batch, seq, d_ff)])."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(tokens, labels):
        m = nnx.merge(graphdef, state)
        captured = []
        logits, _ = m(tokens, neuron_hook=lambda layer, ffn, a: captured.append(a) or a)
        ce, mask = token_losses(logits, labels)
        return ce, mask, captured

    return run


def mean_loss(run, batches, *args) -> float:
    total, n = 0.0, 0
    for batch in batches:
        ce, mask = run(jnp.asarray(batch["inputs"]), jnp.asarray(batch["labels"]), *args)
        total += float(jnp.sum(ce))
        n += int(jnp.sum(mask))
    return total / max(n, 1)


def spearman(x, y) -> float:
    """Spearman rank correlation with average ranks for ties (nan if either side is constant)."""
    rx, ry = _ranks(np.asarray(x, np.float64)), _ranks(np.asarray(y, np.float64))
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def _ranks(v: np.ndarray) -> np.ndarray:
    order = np.argsort(v, kind="stable")
    ranks = np.empty(len(v))
    ranks[order] = np.arange(len(v), dtype=np.float64)
    values, inverse = np.unique(v, return_inverse=True)
    sums = np.bincount(inverse, weights=ranks)
    counts = np.bincount(inverse)
    return (sums / counts)[inverse]
