"""Mixer `gla`: gated linear attention with a data-dependent decay (Yang et al. 2023, arXiv 2312.06635;
flash-linear-attention's `GatedLinearAttention` layer).

Per head, state S (d_k x d_v):

    S_t = diag(alpha_t) S_{t-1} + k_t v_t^T        o_t = S_t^T q_t / sqrt(d_k)
    log alpha_t = logsigmoid(W_a x_t + b_a) / gate_logit_normalizer            (<= 0)
    out = o_proj(RMSNorm_per_head(o) * silu(g_proj(x)))

`gate=per_dim`: alpha_t has one value per key dim, W_a low rank (d_model -> gate_low_rank -> d_k per
head), as in GLA. `gate=per_head`: one scalar per head ("simple GLA"; Mamba-2-like decay), W_a is
d_model -> n_heads. Training: `gated_linear_attention.gla_chunked` (log-space, secondary chunking); decoding:
`gated_linear_attention.gla_step`; `gated_linear_attention.gla_reference` is the plain scan over time both are tested against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from baselines.gated_linear_attention import check_scan, check_threshold, gla_chunked, gla_step, horizon
from cfm_jax.errors import UserError
from cfm_jax.layers.attention import FP32_BYTES
from cfm_jax.layers.common import Linear, linear, make_aux, normal_init, output_init
from cfm_jax.layers.short_conv import ShortConv
from cfm_jax.registry import LayerContext, SlotConfig, register


@dataclass(frozen=True)
class GLAConfig(SlotConfig):
    n_heads: int = 4  # heads; each has a d_k x d_v state
    expand_k: float = 0.5  # total key width = expand_k * d_model (fla default)
    expand_v: float = 1.0  # total value width = expand_v * d_model
    gate: Literal["per_dim", "per_head"] = "per_dim"  # decay per key dim (GLA) or per head (simple GLA)
    gate_low_rank: int = 16  # rank of the per_dim gate projection
    gate_logit_normalizer: float = 16.0  # log alpha = logsigmoid(.) / this: keeps decays near 1 at init
    norm_eps: float = 1e-5  # epsilon of the per-head output RMSNorm
    chunk_size: int = 32  # tokens per chunk of the training form (any length works; tail is padded)
    sub_chunk: int = 8  # tokens per intra-chunk block (per_dim gate); must divide chunk_size
    scan: str = "auto"  # within a chunk: "matmul", "sequential", or "auto" (sequential for small head states)
    conv_size: int = 0  # taps of a causal depthwise conv (+ SiLU) on q, k, v (fla's use_short_conv: 4); 0 = none

    def key_dim(self, d_model: int) -> int:
        return int(self.expand_k * d_model)

    def value_dim(self, d_model: int) -> int:
        return int(self.expand_v * d_model)

    def validate(self, d_model: int) -> None:
        if self.n_heads < 1:
            raise UserError(f"model.mixer.n_heads={self.n_heads} must be >= 1")
        for name, kind, width in (("expand_k", "key", self.key_dim(d_model)), ("expand_v", "value", self.value_dim(d_model))):
            if width < self.n_heads:
                raise UserError(
                    f"model.mixer.{name}={getattr(self, name)} gives a {kind} width of {width} at "
                    f"d_model={d_model}; it must be >= n_heads={self.n_heads}"
                )
            if width % self.n_heads:
                raise UserError(f"model.mixer.n_heads={self.n_heads} must divide the {kind} width {width} ({name} x d_model)")
        if self.gate_low_rank < 1:
            raise UserError(f"model.mixer.gate_low_rank={self.gate_low_rank} must be >= 1")
        if self.gate_logit_normalizer <= 0 or self.norm_eps <= 0:
            raise UserError("model.mixer.gate_logit_normalizer and norm_eps must be > 0")
        if self.chunk_size < 1 or self.sub_chunk < 1 or self.chunk_size % self.sub_chunk:
            raise UserError(
                f"model.mixer.sub_chunk={self.sub_chunk} must be >= 1 and divide chunk_size={self.chunk_size}"
            )
        check_scan(self.scan)
        if self.conv_size < 0:
            raise UserError(f"model.mixer.conv_size={self.conv_size} must be >= 0 (0 = no short conv)")

    def param_count(self, d_model: int) -> int:
        """Parameters of one layer: q, k, v, g projections, the gate, the norm weight, o_proj."""
        K, V, H = self.key_dim(d_model), self.value_dim(d_model), self.n_heads
        gate = d_model * self.gate_low_rank + (self.gate_low_rank + 1) * K if self.gate == "per_dim" else (d_model + 1) * H
        conv = (self.conv_size + 1) * (2 * K + V) if self.conv_size else 0
        return 2 * d_model * K + 2 * d_model * V + gate + V // H + V * d_model + conv


@register("mixer", "gla", GLAConfig)
class GLA(nnx.Module):
    def __init__(self, cfg: GLAConfig, ctx: LayerContext, *, rngs: nnx.Rngs):
        d, K, V, H = ctx.d_model, cfg.key_dim(ctx.d_model), cfg.value_dim(ctx.d_model), cfg.n_heads
        self.cfg, self.d_model, self.n_heads, self.dk, self.dv = cfg, d, H, K // H, V // H
        init = normal_init(ctx.init_std)
        self.q_proj, self.k_proj = linear(d, K, init, rngs), linear(d, K, init, rngs)
        self.v_proj, self.g_proj = linear(d, V, init, rngs), linear(d, V, init, rngs)
        if cfg.gate == "per_dim":
            self.gate_down = linear(d, cfg.gate_low_rank, init, rngs)
            self.gate_up = Linear(cfg.gate_low_rank, K, kernel_init=init, rngs=rngs)
        else:
            self.gate_up = Linear(d, H, kernel_init=init, rngs=rngs)
        self.norm_weight = nnx.Param(jnp.asarray(np.ones(self.dv, np.float32)))  # shared by heads, as fla's gated RMSNorm
        self.o_proj = linear(V, d, output_init(ctx), rngs)
        self.conv = ShortConv(2 * K + V, cfg.conv_size, rngs=rngs) if cfg.conv_size else None

    def _log_decay(self, x: jax.Array) -> jax.Array:
        """x: (..., d_model) -> log alpha (..., H, d_k or 1) fp32, <= 0."""
        h = self.gate_down(x) if self.cfg.gate == "per_dim" else x
        logits = self.gate_up(h).astype(jnp.float32)
        return (jax.nn.log_sigmoid(logits) / self.cfg.gate_logit_normalizer).reshape(*x.shape[:-1], self.n_heads, -1)

    def _project(self, x: jax.Array) -> jax.Array:
        """x: (..., d_model) -> q, k, v projections side by side (..., 2 K + V)."""
        return jnp.concatenate([self.q_proj(x), self.k_proj(x), self.v_proj(x)], axis=-1)

    def _qkv(self, qkv: jax.Array):
        """(..., 2 K + V) -> q, k (..., H, d_k) with q scaled by d_k^-1/2; v (..., H, d_v)."""
        K = self.n_heads * self.dk
        split = lambda a, n: a.reshape(*qkv.shape[:-1], self.n_heads, n)
        return split(qkv[..., :K], self.dk) * self.dk**-0.5, split(qkv[..., K:2 * K], self.dk), split(qkv[..., 2 * K:], self.dv)

    def _output(self, o: jax.Array, x: jax.Array) -> jax.Array:
        """o: (..., H, d_v) fp32 -> per-head RMSNorm, silu output gate, o_proj -> (..., d_model)."""
        o = o * jax.lax.rsqrt(jnp.mean(o**2, axis=-1, keepdims=True) + self.cfg.norm_eps) * self.norm_weight[...]
        o = o.reshape(*x.shape[:-1], -1) * jax.nn.silu(self.g_proj(x))
        return self.o_proj(o.astype(x.dtype))

    def __call__(self, x: jax.Array):
        """x: (batch, seq, d_model) -> (y: (batch, seq, d_model), aux with the memory horizon)."""
        qkv = self._project(x)
        q, k, v = self._qkv(self.conv(qkv) if self.conv is not None else qkv)
        la = self._log_decay(x)
        o, _ = gla_chunked(q, k, v, la, chunk=self.cfg.chunk_size, sub_chunk=self.cfg.sub_chunk,
                           scan=self.cfg.scan)
        return self._output(o, x), make_aux(memory_horizon=horizon(jnp.mean(la, axis=(0, 1))))

    # --- decoding ---

    def init_state(self, batch: int, max_len: int) -> dict:
        """S: (batch, H, d_k, d_v) fp32 (+ the conv's last inputs); max_len unused (the state does not grow)."""
        state = {"S": jnp.zeros((batch, self.n_heads, self.dk, self.dv))}
        if self.conv is not None:
            state["conv"] = self.conv.init_state(batch)
        return state

    def step(self, x: jax.Array, state: dict):
        """One token. x: (batch, d_model) -> (y: (batch, d_model), new state)."""
        qkv, new = self._project(x), {}
        if self.conv is not None:
            qkv, new["conv"] = self.conv.step(qkv, state["conv"])
        q, k, v = (a.astype(jnp.float32) for a in self._qkv(qkv))
        o, S = gla_step(state["S"], q, k, v, self._log_decay(x))
        return self._output(o, x), {"S": S, **new}

    # --- accounting ---

    def state_bytes(self, context_len: int) -> int:
        """Per sequence (fp32), independent of context_len: H d_k d_v (+ the conv's last inputs)."""
        return self.n_heads * self.dk * self.dv * FP32_BYTES + (self.conv.state_bytes() if self.conv is not None else 0)

    def flops_per_token(self, context_len: int) -> int:
        """Forward FLOPs per token (2 per multiply-add) of the recurrent form; independent of context_len.
        Projections plus 5 H d_k d_v for the state: decay and add k v^T (3), read q . S (2)."""
        d, H, K, V = self.d_model, self.n_heads, self.n_heads * self.dk, self.n_heads * self.dv
        gate = 2 * (d * self.cfg.gate_low_rank + self.cfg.gate_low_rank * K) if self.cfg.gate == "per_dim" else 2 * d * H
        conv = 2 * self.cfg.conv_size * (2 * K + V)
        return 2 * d * (2 * K + 2 * V) + gate + 2 * V * d + 5 * H * self.dk * self.dv + conv

    def decay_stats(self, x: jax.Array | None = None) -> jax.Array:
        """Mean log-decay per token of each decay channel, (H * d_k,) or (H,) for per_head, <= 0,
        averaged over the tokens of x (the mixer input, (batch, seq, d_model)); x = None uses the gate
        bias alone (zero input)."""
        if x is None:
            x = jnp.zeros((1, 1, self.d_model))
        return jnp.mean(self._log_decay(x), axis=(0, 1)).reshape(-1)

    def memory_horizon(self, threshold: float = 0.01, x: jax.Array | None = None) -> float:
        """Tokens after which the mean retained fraction of the state, mean_i exp(distance * l_i) over
        `decay_stats(x)`, falls below `threshold` (see `gated_linear_attention.horizon`)."""
        check_threshold(threshold)
        return float(np.asarray(horizon(self.decay_stats(x), threshold)))
