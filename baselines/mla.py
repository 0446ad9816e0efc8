"""Mixer `mla`: multi-head latent attention (DeepSeek-V2, arXiv 2405.04434), a KV-compression baseline.

Per token the cache holds a latent c = RMSNorm(W_dkv x) (latent_dim) and one RoPE key shared by all
heads k_r = RoPE(W_kr x) (rope_dim), instead of full per-head K and V. Per head h:

    k_h = [W_uk,h c ; k_r]     v_h = W_uv,h c     q_h = [W_q,h x ; RoPE(W_qr,h x)]

Training up-projects K and V and runs causal softmax attention. Decoding uses the "absorbed" form:
W_uk is folded into the query (q_h^T W_uk,h, a latent-space query) and W_uv applied after the
weighted sum of latents, so the cache is never up-projected. Left out: DeepSeek's low-rank query
compression (queries are a full-rank projection here) and YaRN scaling.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from cfm_jax.errors import UserError
from cfm_jax.layers.attention import FP32_BYTES, _attend, check_causal_block
from cfm_jax.layers.common import RMSNorm, linear, make_aux, normal_init, output_init, rope
from cfm_jax.registry import LayerContext, SlotConfig, register


@dataclass(frozen=True)
class MLAConfig(SlotConfig):
    n_heads: int = 4  # query heads; head_dim = d_model // n_heads for the non-RoPE q/k part and for v
    latent_dim: int = 64  # d_c: cached latent per token (DeepSeek-V2: 4 * head_dim = 512)
    rope_dim: int = 16  # decoupled RoPE dims of q (per head) and of the shared cached key; even, 0 = none
    rope_theta: float = 10000.0  # RoPE base period
    # Training / eval sequences longer than this attend in query blocks (memory O(L * chunk)); 0 = never.
    query_chunk: int = 1024
    causal_block: int = 128  # shorter sequences: query blocks reading only their key prefix (0 = off)

    def param_count(self, d_model: int) -> int:
        h, hd, c, r = self.n_heads, d_model // self.n_heads, self.latent_dim, self.rope_dim
        return d_model * h * (hd + r) + d_model * (c + r) + c + c * h * 2 * hd + h * hd * d_model

    def validate(self, d_model: int) -> None:
        if self.n_heads < 1 or d_model % self.n_heads:
            raise UserError(f"model.mixer.n_heads={self.n_heads} must be >= 1 and divide model.d_model={d_model}")
        if self.latent_dim < 1:
            raise UserError(f"model.mixer.latent_dim={self.latent_dim} must be >= 1 (cached dims per token)")
        if self.rope_dim < 0 or self.rope_dim % 2:
            raise UserError(f"model.mixer.rope_dim={self.rope_dim} must be even and >= 0 (0 = no RoPE)")
        if self.rope_theta <= 0:
            raise UserError(f"model.mixer.rope_theta={self.rope_theta} must be > 0")
        if self.query_chunk < 0:
            raise UserError(f"model.mixer.query_chunk={self.query_chunk} must be >= 0 (0 = never chunk)")
        check_causal_block(self.causal_block)


@register("mixer", "mla", MLAConfig)
class MLA(nnx.Module):
    def __init__(self, cfg: MLAConfig, ctx: LayerContext, *, rngs: nnx.Rngs):
        self.cfg, d = cfg, ctx.d_model
        self.n_heads, self.head_dim = cfg.n_heads, d // cfg.n_heads
        h, hd, c, r = self.n_heads, self.head_dim, cfg.latent_dim, cfg.rope_dim
        init = normal_init(ctx.init_std)
        self.q_proj = linear(d, h * (hd + r), init, rngs)  # [nope | rope] per head
        self.kv_down = linear(d, c + r, init, rngs)  # [latent | shared rope key]
        self.kv_norm = RMSNorm(c, rngs=rngs)
        self.k_up = nnx.Param(init(rngs.params(), (c, h, hd)))  # W_uk: latent -> per-head key
        self.v_up = nnx.Param(init(rngs.params(), (c, h, hd)))  # W_uv: latent -> per-head value
        self.o_proj = linear(h * hd, d, output_init(ctx), rngs)

    def _project(self, x: jax.Array, positions: jax.Array):
        """x: (B, L, d_model) -> q_nope (B, L, H, hd), q_rope (B, L, H, r), latent (B, L, c), k_rope (B, L, r)."""
        b, s, _ = x.shape
        c, r = self.cfg.latent_dim, self.cfg.rope_dim
        q = self.q_proj(x).reshape(b, s, self.n_heads, self.head_dim + r)
        q_nope, q_rope = q[..., : self.head_dim], rope(q[..., self.head_dim:], positions, self.cfg.rope_theta)
        kv = self.kv_down(x)
        k_rope = rope(kv[..., None, c:], positions, self.cfg.rope_theta)[:, :, 0]
        return q_nope, q_rope, self.kv_norm(kv[..., :c]), k_rope

    def _scale(self) -> float:
        return (self.head_dim + self.cfg.rope_dim) ** -0.5

    def __call__(self, x: jax.Array):
        """x: (batch, seq, d_model) -> (y: (batch, seq, d_model), aux)."""
        b, s, _ = x.shape
        q_nope, q_rope, latent, k_rope = self._project(x, jnp.arange(s))
        k_nope = jnp.einsum("blc,chd->blhd", latent, self.k_up[...])
        v = jnp.einsum("blc,chd->blhd", latent, self.v_up[...])
        q = jnp.concatenate([q_nope, q_rope], axis=-1)
        k = jnp.concatenate([k_nope, jnp.broadcast_to(k_rope[:, :, None], q_rope.shape)], axis=-1)
        # XLA's fused attention (`_attend`'s short-sequence fallback) wants v as wide as q/k: zero-pad
        # v's rope_dim columns, then drop them.
        v = jnp.pad(v, ((0, 0), (0, 0), (0, 0), (0, self.cfg.rope_dim)))
        y = _attend(q, k, v, self.cfg.query_chunk, scale=self._scale(), causal_block=self.cfg.causal_block)[..., : self.head_dim]
        return self.o_proj(y.reshape(b, s, self.n_heads * self.head_dim)), make_aux()

    # --- decoding ---

    def init_state(self, batch: int, max_len: int) -> dict:
        """Latent cache: latent (batch, max_len, latent_dim), k_rope (batch, max_len, rope_dim), pos ()."""
        return {"latent": jnp.zeros((batch, max_len, self.cfg.latent_dim)),
                "k_rope": jnp.zeros((batch, max_len, self.cfg.rope_dim)), "pos": jnp.zeros((), jnp.int32)}

    def step(self, x: jax.Array, state: dict):
        """One token, absorbed form. x: (batch, d_model) -> (y: (batch, d_model), new state)."""
        b, pos = x.shape[0], state["pos"]
        q_nope, q_rope, latent, k_rope = (t[:, 0] for t in self._project(x[:, None, :], pos[None]))
        write = lambda cache, row: jax.lax.dynamic_update_slice(cache, row[:, None].astype(cache.dtype), (0, pos, 0))
        lat_cache, rope_cache = write(state["latent"], latent), write(state["k_rope"], k_rope)
        q_latent = jnp.einsum("bhd,chd->bhc", q_nope, self.k_up[...])  # W_uk absorbed into the query
        scores = (jnp.einsum("bhc,bsc->bhs", q_latent, lat_cache)
                  + jnp.einsum("bhr,bsr->bhs", q_rope, rope_cache)) * self._scale()
        probs = jax.nn.softmax(jnp.where(jnp.arange(lat_cache.shape[1]) <= pos, scores, -jnp.inf), axis=-1)
        out = jnp.einsum("bhc,chd->bhd", jnp.einsum("bhs,bsc->bhc", probs, lat_cache), self.v_up[...])
        y = self.o_proj(out.reshape(b, self.n_heads * self.head_dim))
        return y, {"latent": lat_cache, "k_rope": rope_cache, "pos": pos + 1}

    # --- accounting ---

    def state_bytes(self, context_len: int) -> int:
        """Latent cache bytes per sequence (fp32): (latent_dim + rope_dim) per token."""
        return (self.cfg.latent_dim + self.cfg.rope_dim) * context_len * FP32_BYTES

    def flops_per_token(self, context_len: int) -> int:
        """Forward FLOPs of one decoding token in the absorbed form, attending to `context_len` tokens."""
        d, h, hd, c, r = self.q_proj.in_features, self.n_heads, self.head_dim, self.cfg.latent_dim, self.cfg.rope_dim
        projections = 2 * d * (h * (hd + r) + c + r) + 2 * h * hd * d
        absorb = 2 * 2 * h * hd * c  # q_nope -> latent query, latent context -> per-head value
        return projections + absorb + 2 * h * context_len * (2 * c + r)
