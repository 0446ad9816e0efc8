"""FFN `neuron_sparse`: the CFM idea. The activation function itself switches neurons off per token.

No router, no fixed k, no balancing loss: a neuron is active for a token iff its activation is
nonzero, so the number of active neurons adapts to the token. Options:

    activation  relu       a = relu(x W_u)                          y = a W_d
                relu2      a = relu(x W_u)^2               (Primer; "ReLU^2 wins")
                reglu      a = relu(x W_g) * (x W_u)        (gated)
                relu2_glu  a = relu(x W_g)^2 * (x W_u)      (gated ReLU^2, as in "ReLU^2 wins")
                drelu      a = relu(x W_g) * relu(x W_u)    (TurboSparse dReLU)
    threshold   FATReLU: a ReLU input must exceed t (> 0) to pass (ProSparse step 3); 0 = plain ReLU
    l1_coef     L1 penalty on activations, coef * mean_{tokens, neurons} |a|, as the aux loss, with a
                constant or ProSparse-style staged sine-shaped schedule (see `l1_coefficient`)
    top_k       > 0: keep only the k largest |a| per token, the fixed-k control (Q-Sparse / CATS)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from cfm_jax.errors import UserError
from cfm_jax.layers.activation_stats import activation_stats
from cfm_jax.layers.common import linear, make_aux, normal_init, output_init, training_step_variable
from cfm_jax.registry import LayerContext, SlotConfig, register

GATED = ("reglu", "relu2_glu", "drelu")


@dataclass(frozen=True)
class NeuronSparseConfig(SlotConfig):
    activation: Literal["relu", "relu2", "reglu", "relu2_glu", "drelu"] = "relu"  # see module doc
    # Hidden width; 0 = 4*d_model (relu, relu2), or 8/3*d_model rounded up to a multiple of 8 for
    # the gated forms (same parameter count as the two-matrix forms).
    d_ff: int = 0
    threshold: float = 0.0  # FATReLU threshold t >= 0 on the ReLU inputs (0 = plain ReLU)
    l1_coef: float = 0.0  # final L1 coefficient on mean |activation| (0 = no penalty)
    l1_schedule: Literal["constant", "prosparse"] = "constant"  # how the coefficient reaches l1_coef
    l1_stages: int = 4  # prosparse: number of stages; stage i ends at l1_coef * i / l1_stages
    l1_stage_steps: int = 250  # prosparse: optimizer steps per stage (sine-shaped rise within each)
    top_k: int = 0  # > 0: keep only the k largest |activations| per token (fixed-k control)

    def width(self, d_model: int) -> int:
        if self.d_ff:
            return self.d_ff
        if self.activation in GATED:
            return -(-(8 * d_model // 3) // 8) * 8
        return 4 * d_model

    def validate(self, d_model: int) -> None:
        if self.d_ff < 0:
            raise UserError(f"model.ffn.d_ff={self.d_ff} must be >= 0 (0 = default width)")
        if self.threshold < 0:
            raise UserError(f"model.ffn.threshold={self.threshold} must be >= 0")
        if self.l1_coef < 0:
            raise UserError(f"model.ffn.l1_coef={self.l1_coef} must be >= 0")
        if self.l1_stages < 1 or self.l1_stage_steps < 1:
            raise UserError("model.ffn.l1_stages and model.ffn.l1_stage_steps must be >= 1")
        if not 0 <= self.top_k <= self.width(d_model):
            raise UserError(
                f"model.ffn.top_k={self.top_k} must be in [0, d_ff={self.width(d_model)}] (0 = off)"
            )


def l1_coefficient(cfg: NeuronSparseConfig, step: jax.Array) -> jax.Array:
    """The L1 coefficient at optimizer `step`.

    constant: l1_coef throughout. prosparse: in stage i (0-based, l1_stage_steps long) the
    coefficient rises from l1_coef*i/S to l1_coef*(i+1)/S along sin(pi/2 * t/T), then stays at l1_coef.
    """
    if cfg.l1_schedule == "constant":
        return jnp.asarray(cfg.l1_coef, jnp.float32)
    stages, length = cfg.l1_stages, cfg.l1_stage_steps
    step = jnp.asarray(step, jnp.float32)
    stage = jnp.minimum(jnp.floor(step / length), stages - 1)
    progress = jnp.clip((step - stage * length) / length, 0.0, 1.0)
    coef = cfg.l1_coef * (stage + jnp.sin(0.5 * math.pi * progress)) / stages
    return coef.astype(jnp.float32)


def keep_top_k(a: jax.Array, k: int) -> jax.Array:
    """Zero all but the k largest |a| along the last axis (ties at the k-th value are all kept)."""
    kth = jax.lax.top_k(jnp.abs(a), k)[0][..., -1:]
    return jnp.where(jnp.abs(a) >= jax.lax.stop_gradient(kth), a, 0.0)


def fat_relu(x: jax.Array, threshold: float) -> jax.Array:
    """x if x > threshold else 0 (threshold 0: ReLU)."""
    return jnp.where(x > threshold, x, 0.0)


@register("ffn", "neuron_sparse", NeuronSparseConfig)
class NeuronSparseFFN(nnx.Module):
    def __init__(self, cfg: NeuronSparseConfig, ctx: LayerContext, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, f = ctx.d_model, cfg.width(ctx.d_model)
        init = normal_init(ctx.init_std)
        self.up = linear(d, f, init, rngs)
        self.gate = linear(d, f, init, rngs) if cfg.activation in GATED else None
        self.down = linear(f, d, output_init(ctx), rngs)
        self.train_step = training_step_variable()  # drives the L1 schedule

    def hidden(self, x: jax.Array) -> jax.Array:
        """x: (..., d_model) -> activations a: (..., d_ff), exactly zero for inactive neurons."""
        return self._hidden_and_selected(x)[0]

    def _hidden_and_selected(self, x: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        """(a, gate): a as `hidden`; for gated forms also the gate's activation relu(x W_g) (a sparse
        kernel reads a neuron's up row wherever it is nonzero, even where the product a is zero)."""
        cfg, t = self.cfg, self.cfg.threshold
        gate = fat_relu(self.gate(x), t) if cfg.activation in GATED else None
        if cfg.activation == "relu":
            a = fat_relu(self.up(x), t)
        elif cfg.activation == "relu2":
            a = fat_relu(self.up(x), t) ** 2
        elif cfg.activation == "reglu":
            a = gate * self.up(x)
        elif cfg.activation == "relu2_glu":
            a = gate**2 * self.up(x)
        else:  # drelu
            a = gate * fat_relu(self.up(x), t)
        return (keep_top_k(a, cfg.top_k) if cfg.top_k else a), gate

    def __call__(self, x: jax.Array):
        """x: (batch, seq, d_model) -> (y: (batch, seq, d_model), aux with L1 loss and sparsity stats).
        Gated forms also report gate_ratio: the fraction of (token, neuron) pairs whose gate is open."""
        a, gate = self._hidden_and_selected(x)
        coef = l1_coefficient(self.cfg, self.train_step[...])
        l1 = jnp.mean(jnp.abs(a))
        stats = activation_stats(a)
        if gate is not None:
            stats["gate_ratio"] = jnp.mean((jax.lax.stop_gradient(gate) != 0).astype(jnp.float32))
        if self.cfg.l1_coef > 0:
            stats.update(l1=l1, l1_coef=coef)
        return self.down(a), make_aux(coef * l1, **stats)

    # --- accounting ---

    def param_count(self) -> int:
        n_in = 2 if self.gate is not None else 1
        return (n_in + 1) * self.up.in_features * self.up.out_features

    def flops_per_token(self) -> int:
        """Dense-equivalent forward FLOPs (every neuron computed, as training does)."""
        return 2 * self.param_count()

    def active_params_per_token(self, activation_ratio: float = 1.0, gate_ratio: float = 1.0) -> int:
        """Weights a sparse kernel must read per token: the selector in full (the gate matrix of a gated
        form, else up), then for a gated form the up rows of every neuron whose gate is open
        (gate_ratio), and the down rows of every neuron whose activation is nonzero (activation_ratio).
        Both 1 give all weights."""
        d, f = self.up.in_features, self.up.out_features
        up_rows = d * f * gate_ratio if self.gate is not None else 0
        return int(d * f + round(up_rows + d * f * activation_ratio))
