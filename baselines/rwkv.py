"""Mixer `rwkv`: the RWKV-6 ("Finch") time-mix (Peng et al. 2024, arXiv 2404.05892; RWKV-LM's
`RWKV_Tmix_x060`).

Token shift with data-dependent interpolation (ddlerp), then per head a d_k x d_v state:

    xx = x_{t-1} - x_t;  m = x_t + xx * mu_x;  (m_w, m_k, m_v, m_r, m_g) = tanh(m A_mix) B_mix
    x_* = x_t + xx * (mu_* + m_*)                 for * in w, k, v, r, g
    r, k, v = W_r x_r, W_k x_k, W_v x_v;  g = silu(W_g x_g)
    log w_t = -exp(w_0 + tanh(x_w A_w) B_w)        (data-dependent decay, <= 0)
    o_t = r_t . (S_{t-1} + diag(u) k_t v_t^T);    S_t = diag(w_t) S_{t-1} + k_t v_t^T
    out = W_o(GroupNorm_per_head(o) * g)

Training: `gated_linear_attention.gla_chunked(..., bonus=u)` (log-space, secondary chunking); decoding:
`gated_linear_attention.gla_step` plus the previous input for the token shift.

Left out of RWKV-6 (the rest of the block is the project's, not RWKV's): the channel-mix (the block's
`ffn` slot plays that part), ln0 after the embedding, RWKV's own init of the projections (orthogonal /
zero output; here the project's normal init, so every parameter gets a gradient at step 0) and its
per-parameter learning rates. The decay exponent is clamped at DECAY_CLAMP (a step keeps at least
exp(-e^4) ~ 2e-24 of the state) so exp never overflows to -inf log-decays.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from baselines.gated_linear_attention import check_scan, check_threshold, gla_chunked, gla_step, horizon
from cfm_jax.errors import UserError
from cfm_jax.layers.attention import FP32_BYTES
from cfm_jax.layers.common import linear, make_aux, normal_init, output_init
from cfm_jax.registry import LayerContext, SlotConfig, register

DECAY_CLAMP = 4.0  # upper bound of w_0 + lora(x): log w >= -e^4
MIX = ("w", "k", "v", "r", "g")  # the five token-shift interpolations


@dataclass(frozen=True)
class RWKVConfig(SlotConfig):
    n_heads: int = 4  # heads; head_size = d_model / n_heads (RWKV-6 fixes head_size 64 instead)
    mix_low_rank: int = 32  # rank of the data-dependent token-shift LoRA (TIME_MIX_EXTRA_DIM)
    decay_low_rank: int = 64  # rank of the data-dependent decay LoRA (TIME_DECAY_EXTRA_DIM)
    norm_eps: float = 64e-5  # GroupNorm epsilon (RWKV-6: 1e-5 * head_size_divisor^2)
    chunk_size: int = 32  # tokens per chunk of the training form (any length works; tail is padded)
    sub_chunk: int = 8  # tokens per intra-chunk block; must divide chunk_size
    scan: str = "auto"  # within a chunk: "matmul", "sequential", or "auto" (sequential for small head states)

    def validate(self, d_model: int) -> None:
        if self.n_heads < 1 or d_model % self.n_heads:
            raise UserError(f"model.mixer.n_heads={self.n_heads} must be >= 1 and divide model.d_model={d_model}")
        for name in ("mix_low_rank", "decay_low_rank"):
            if getattr(self, name) < 1:
                raise UserError(f"model.mixer.{name}={getattr(self, name)} must be >= 1")
        if self.norm_eps <= 0:
            raise UserError(f"model.mixer.norm_eps={self.norm_eps} must be > 0")
        if self.chunk_size < 1 or self.sub_chunk < 1 or self.chunk_size % self.sub_chunk:
            raise UserError(
                f"model.mixer.sub_chunk={self.sub_chunk} must be >= 1 and divide chunk_size={self.chunk_size}"
            )
        check_scan(self.scan)

    def param_count(self, d_model: int) -> int:
        """Parameters of one layer: mu (6 d), mix LoRA, w_0, decay LoRA, u, W_r,k,v,g,o, GroupNorm (2 d)."""
        d, rm, rd = d_model, self.mix_low_rank, self.decay_low_rank
        return 6 * d + 2 * 5 * rm * d + d + 2 * rd * d + d + 5 * d * d + 2 * d


def _uniform(rngs: nnx.Rngs, shape: tuple[int, ...], bound: float) -> nnx.Param:
    return nnx.Param(jax.random.uniform(rngs.params(), shape, minval=-bound, maxval=bound))


@register("mixer", "rwkv", RWKVConfig)
class RWKV6(nnx.Module):
    def __init__(self, cfg: RWKVConfig, ctx: LayerContext, *, rngs: nnx.Rngs):
        d, H = ctx.d_model, cfg.n_heads
        self.cfg, self.d_model, self.n_heads, self.head = cfg, d, H, d // H
        # RWKV-6 init of the time parameters: depth-dependent ramps over the channels. They are 1-D,
        # so the trainer leaves them out of weight decay, as RWKV does.
        depth = ctx.layer / max(ctx.n_layers - 1, 1)  # 0 -> 1 over the layers
        keep = 1.0 - ctx.layer / ctx.n_layers  # 1 -> almost 0
        ramp = np.arange(d, dtype=np.float32) / d
        self.mu_x = nnx.Param(jnp.asarray(1.0 - ramp**keep))
        self.mu = nnx.Param(jnp.asarray(np.concatenate([  # (5 d,) flat: w, k, v, r, g
            1.0 - ramp**keep, 1.0 - ramp**keep, 1.0 - (ramp**keep + 0.3 * depth),
            1.0 - ramp ** (0.5 * keep), 1.0 - ramp ** (0.5 * keep)]).astype(np.float32)))
        self.mix_a = nnx.Param(normal_init(0.01)(rngs.params(), (d, 5 * cfg.mix_low_rank)))  # RWKV: zeros
        self.mix_b = _uniform(rngs, (5, cfg.mix_low_rank, d), 0.01)
        n = np.arange(d, dtype=np.float32) / max(d - 1, 1)
        self.w0 = nnx.Param(jnp.asarray(-6.0 + 5.0 * n ** (0.7 + 1.3 * depth), jnp.float32))  # log-log decay: -6 slow .. -1 fast
        self.decay_a = nnx.Param(normal_init(0.01)(rngs.params(), (d, cfg.decay_low_rank)))  # RWKV: zeros
        self.decay_b = _uniform(rngs, (cfg.decay_low_rank, d), 0.01)
        self.u = nnx.Param(jnp.asarray(depth * (1.0 - n) + ((np.arange(d) + 1) % 3 - 1) * 0.1, jnp.float32))  # bonus
        init = normal_init(ctx.init_std)
        self.r_proj, self.k_proj = linear(d, d, init, rngs), linear(d, d, init, rngs)
        self.v_proj, self.g_proj = linear(d, d, init, rngs), linear(d, d, init, rngs)
        self.o_proj = linear(d, d, output_init(ctx), rngs)
        self.norm_scale = nnx.Param(jnp.asarray(np.ones(d, np.float32)))
        self.norm_bias = nnx.Param(jnp.asarray(np.zeros(d, np.float32)))

    def _mix(self, x: jax.Array, x_prev: jax.Array):
        """Token shift with ddlerp. x, x_prev: (..., d) -> (x_w, x_k, x_v, x_r, x_g), each (..., d)."""
        xx = x_prev - x
        # The mu vectors stay float32 parameters; cast to x's dtype so bfloat16 compute stays bfloat16.
        m = jnp.tanh((x + xx * self.mu_x[...].astype(x.dtype)) @ self.mix_a[...])
        m = m.reshape(*m.shape[:-1], 5, self.cfg.mix_low_rank)
        mu, mix_b = self.mu[...].astype(x.dtype).reshape(5, self.d_model), self.mix_b[...]
        # Five 2-D products, not one batched einsum: XLA:CPU laid that out (5, d, tokens), and every
        # elementwise use of it read d with a stride of all the tokens (6 fusions of ~48 ms per layer
        # in the backward pass at 8 x 512 tokens, where a token-major read takes ~2 ms).
        return tuple(x + xx * (m[..., i, :] @ mix_b[i] + mu[i]) for i in range(5))

    def _log_decay(self, x_w: jax.Array) -> jax.Array:
        """x_w: (..., d) -> log w (..., H, head) fp32, in [-e^DECAY_CLAMP, 0)."""
        w = self.w0[...] + jnp.tanh(x_w @ self.decay_a[...]) @ self.decay_b[...]
        return -jnp.exp(jnp.minimum(w.astype(jnp.float32), DECAY_CLAMP)).reshape(*x_w.shape[:-1], self.n_heads, self.head)

    def _project(self, x: jax.Array, x_prev: jax.Array):
        """-> r, k, v (..., H, head), log w (..., H, head), g (..., d)."""
        x_w, x_k, x_v, x_r, x_g = self._mix(x, x_prev)
        split = lambda a: a.reshape(*x.shape[:-1], self.n_heads, self.head)
        r, k, v = split(self.r_proj(x_r)), split(self.k_proj(x_k)), split(self.v_proj(x_v))
        return r, k, v, self._log_decay(x_w), jax.nn.silu(self.g_proj(x_g))

    def _output(self, o: jax.Array, g: jax.Array, dtype) -> jax.Array:
        """o: (..., H, head) fp32 -> GroupNorm per head, gate, W_o -> (..., d)."""
        mean = jnp.mean(o, axis=-1, keepdims=True)
        var = jnp.mean((o - mean) ** 2, axis=-1, keepdims=True)
        o = ((o - mean) * jax.lax.rsqrt(var + self.cfg.norm_eps)).reshape(*o.shape[:-2], -1)
        o = o * self.norm_scale[...] + self.norm_bias[...]
        return self.o_proj((o * g).astype(dtype))

    def _bonus(self) -> jax.Array:
        return self.u[...].reshape(self.n_heads, self.head)

    def __call__(self, x: jax.Array):
        """x: (batch, seq, d_model) -> (y: (batch, seq, d_model), aux with the memory horizon)."""
        x_prev = jnp.pad(x, ((0, 0), (1, 0), (0, 0)))[:, :-1]
        r, k, v, lw, g = self._project(x, x_prev)
        o, _ = gla_chunked(r, k, v, lw, bonus=self._bonus(), chunk=self.cfg.chunk_size, sub_chunk=self.cfg.sub_chunk,
                           scan=self.cfg.scan)
        return self._output(o, g, x.dtype), make_aux(memory_horizon=horizon(jnp.mean(lw, axis=(0, 1))))

    # --- decoding ---

    def init_state(self, batch: int, max_len: int) -> dict:
        """S: (batch, H, head, head) fp32; x_prev: (batch, d) the last input (token shift). max_len unused."""
        return {"S": jnp.zeros((batch, self.n_heads, self.head, self.head)), "x_prev": jnp.zeros((batch, self.d_model))}

    def step(self, x: jax.Array, state: dict):
        """One token. x: (batch, d_model) -> (y: (batch, d_model), new state)."""
        r, k, v, lw, g = self._project(x, state["x_prev"].astype(x.dtype))
        r, k, v = (a.astype(jnp.float32) for a in (r, k, v))
        o, S = gla_step(state["S"], r, k, v, lw, bonus=self._bonus())
        return self._output(o, g, x.dtype), {"S": S, "x_prev": x.astype(state["x_prev"].dtype)}

    # --- accounting ---

    def state_bytes(self, context_len: int) -> int:
        """Per sequence (fp32), independent of context_len: H head^2 (wkv state) + d (token shift)."""
        return (self.n_heads * self.head**2 + self.d_model) * FP32_BYTES

    def flops_per_token(self, context_len: int) -> int:
        """Forward FLOPs per token (2 per multiply-add) of the recurrent form; independent of context_len.
        Five d x d projections, the two LoRAs, and 5 H head^2 for the state (bonus read, decay, update)."""
        d, rm, rd = self.d_model, self.cfg.mix_low_rank, self.cfg.decay_low_rank
        return 5 * 2 * d * d + 2 * (2 * 5 * rm * d) + 2 * (2 * rd * d) + 5 * self.n_heads * self.head**2

    def decay_stats(self, x: jax.Array | None = None) -> jax.Array:
        """Mean log-decay per token of each key channel, (H * head,) <= 0, averaged over the tokens of x
        (the mixer input, (batch, seq, d_model)); x = None uses w_0 alone (zero input)."""
        if x is None:
            x = jnp.zeros((1, 1, self.d_model))
        x_prev = jnp.pad(x, ((0, 0), (1, 0), (0, 0)))[:, :-1]
        return jnp.mean(self._log_decay(self._mix(x, x_prev)[0]), axis=(0, 1)).reshape(-1)

    def memory_horizon(self, threshold: float = 0.01, x: jax.Array | None = None) -> float:
        """Tokens after which the mean retained fraction of the state, mean_i exp(distance * l_i) over
        `decay_stats(x)`, falls below `threshold` (see `gated_linear_attention.horizon`)."""
        check_threshold(threshold)
        return float(np.asarray(horizon(self.decay_stats(x), threshold)))
