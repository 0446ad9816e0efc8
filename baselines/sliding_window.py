"""Mixer `sliding_window`: softmax attention over the last `window` tokens plus `sinks` first tokens.

StreamingLLM (Xiao et al. 2023, "Efficient Streaming Language Models with Attention Sinks"): query t
sees key j iff j <= t and (t - j < window or j < sinks). Training computes that mask block by block
(`sliding_window_blocked`: memory ~ L * (block + window + sinks), not L^2); decoding keeps a KV cache of
sinks + window slots, the window part a ring buffer. RoPE uses the original absolute positions (keys are
cached already rotated), so decode equals the forward exactly; StreamingLLM's re-positioning of keys
by their slot in the cache is left out.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from cfm_jax.errors import UserError
from cfm_jax.layers.attention import FP32_BYTES, Attention, AttentionConfig
from cfm_jax.layers.common import make_aux
from cfm_jax.registry import register


@dataclass(frozen=True)
class SlidingWindowConfig(AttentionConfig):
    window: int = 64  # keys per query: the current token and the window-1 before it
    sinks: int = 4  # first tokens every query also sees (StreamingLLM's attention sinks; 0 = none)
    block_size: int = 64  # training: query tokens per block (bounds memory at ~L*(block+window+sinks))

    def param_count(self, d_model: int) -> int:
        hd = d_model // self.n_heads
        return d_model * (self.n_heads + 2 * self.kv_heads()) * hd + self.n_heads * hd * d_model

    def validate(self, d_model: int) -> None:
        super().validate(d_model)
        if self.kernel != "auto":
            raise UserError(f"model.mixer.kernel={self.kernel!r} selects the causal attention kernel; sliding_window "
                            "runs its own blocked path (leave it at auto)")
        if self.window < 1:
            raise UserError(f"model.mixer.window={self.window} must be >= 1 (tokens each query sees)")
        if self.sinks < 0:
            raise UserError(f"model.mixer.sinks={self.sinks} must be >= 0")
        if self.block_size < 1:
            raise UserError(f"model.mixer.block_size={self.block_size} must be >= 1")


def visible(q_pos: jax.Array, k_pos: jax.Array, window: int, sinks: int) -> jax.Array:
    """The sink+window mask: query position q_pos (..., 1) sees key position k_pos (..., S)."""
    return (k_pos <= q_pos) & (k_pos >= 0) & ((q_pos - k_pos < window) | (k_pos < sinks))


def sliding_window_reference(q, k, v, window: int, sinks: int):
    """Plain masked softmax over the full (L, L) score matrix, the obviously-right version.

    q: (B, L, H, hd); k, v: (B, L, K, hd), query head h reads kv head h // (H // K). -> (B, L, H, hd).
    """
    groups = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(q.shape[-1]).astype(q.dtype)
    pos = jnp.arange(q.shape[1])
    scores = jnp.where(visible(pos[:, None], pos[None, :], window, sinks), scores, -jnp.inf)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)


def sliding_window_blocked(q, k, v, window: int, sinks: int, block: int):
    """Same result as `sliding_window_reference`, computed per block of `block` queries.

    Block i (queries [i*c, i*c + c)) scores its c + w - 1 window keys (a contiguous slice, keys padded
    in front by w - 1) and the s sink keys; a sink key still inside the window is masked in the sink
    part so it is counted once. Scores: (B, n, K, G, c, s + c + w - 1), linear in L.
    """
    b, length, h, hd = q.shape
    kv = k.shape[2]
    w, s, c = min(window, length), min(sinks, length), min(block, length)
    n = -(-length // c)
    span = c + w - 1
    kp = jnp.pad(k, ((0, 0), (w - 1, n * c - length), (0, 0), (0, 0)))
    vp = jnp.pad(v, ((0, 0), (w - 1, n * c - length), (0, 0), (0, 0)))
    idx = jnp.arange(n)[:, None] * c + jnp.arange(span)[None, :]  # (n, span) into the padded keys
    k_win, v_win = kp[:, idx], vp[:, idx]  # (B, n, span, K, hd)
    q_pos = jnp.arange(n * c).reshape(n, c, 1)
    k_pos = (idx - (w - 1))[:, None, :]  # absolute key positions, (n, 1, span)
    sink_pos = jnp.arange(s)[None, None, :]
    mask = jnp.concatenate([
        (sink_pos <= q_pos) & (q_pos - sink_pos >= w),  # sinks outside the window
        visible(q_pos, k_pos, w, 0),  # the window
    ], axis=-1)  # (n, c, s + span)
    qb = jnp.pad(q, ((0, 0), (0, n * c - length), (0, 0), (0, 0))).reshape(b, n, c, kv, h // kv, hd)
    scale = 1.0 / jnp.sqrt(hd).astype(q.dtype)
    scores = jnp.concatenate([
        jnp.einsum("bnckgd,bskd->bnkgcs", qb, k[:, :s]),
        jnp.einsum("bnckgd,bnskd->bnkgcs", qb, k_win),
    ], axis=-1) * scale
    probs = jax.nn.softmax(jnp.where(mask[None, :, None, None], scores, -jnp.inf), axis=-1)
    out = (jnp.einsum("bnkgcs,bskd->bnckgd", probs[..., :s], v[:, :s])
           + jnp.einsum("bnkgcs,bnskd->bnckgd", probs[..., s:], v_win))
    return out.reshape(b, n * c, h, hd)[:, :length]


@register("mixer", "sliding_window", SlidingWindowConfig)
class SlidingWindow(Attention):
    """Attention's projections and RoPE (`Attention._qkv`) with the sink+window mask and a ring cache."""

    def __call__(self, x: jax.Array):
        """x: (batch, seq, d_model) -> (y: (batch, seq, d_model), aux)."""
        b, s, _ = x.shape
        q, k, v = self._qkv(x, jnp.arange(s))
        y = sliding_window_blocked(q, k, v, self.cfg.window, self.cfg.sinks, self.cfg.block_size)
        return self.o_proj(y.reshape(b, s, self.n_heads * self.head_dim)), make_aux()

    # --- decoding ---

    def init_state(self, batch: int, max_len: int) -> dict:
        """KV cache of sinks + window slots, whatever max_len: slots [0, sinks) hold tokens 0..sinks-1,
        slot sinks + (j - sinks) % window holds token j >= sinks (a ring). k, v: (batch, kv_heads,
        sinks + window, head_dim) (head-major, as attention's cache) with RoPE applied at the token's
        absolute position; pos: tokens seen."""
        shape = (batch, self.n_kv, self.cfg.sinks + self.cfg.window, self.head_dim)
        return {"k": jnp.zeros(shape), "v": jnp.zeros(shape), "pos": jnp.zeros((), jnp.int32)}

    def step(self, x: jax.Array, state: dict):
        """One token. x: (batch, d_model) -> (y: (batch, d_model), new state). Any number of tokens."""
        b, pos = x.shape[0], state["pos"]
        s, w = self.cfg.sinks, self.cfg.window
        q, k, v = self._qkv(x[:, None, :], pos[None])
        slot = jnp.where(pos < s, pos, s + (pos - s) % w)
        k_cache = jax.lax.dynamic_update_slice(state["k"], jnp.swapaxes(k, 1, 2).astype(state["k"].dtype), (0, 0, slot, 0))
        v_cache = jax.lax.dynamic_update_slice(state["v"], jnp.swapaxes(v, 1, 2).astype(state["v"].dtype), (0, 0, slot, 0))
        # Slot i was first written by token i (sinks) or s + (i - s) (ring): filled iff that is <= pos.
        # A filled ring slot always holds one of the last w tokens, so no further check is needed.
        filled = jnp.arange(s + w) <= pos
        groups = self.n_heads // self.n_kv
        q = q.reshape(b, self.n_kv, groups, self.head_dim)
        scores = jnp.einsum("bkgd,bksd->bkgs", q, k_cache) / jnp.sqrt(self.head_dim).astype(q.dtype)
        probs = jax.nn.softmax(jnp.where(filled, scores, -jnp.inf), axis=-1)
        out = jnp.einsum("bkgs,bksd->bkgd", probs, v_cache).reshape(b, self.n_heads * self.head_dim)
        return self.o_proj(out), {"k": k_cache, "v": v_cache, "pos": pos + 1}

    # --- accounting ---

    def cache_tokens(self, context_len: int) -> int:
        return min(context_len, self.cfg.sinks + self.cfg.window)

    def state_bytes(self, context_len: int) -> int:
        """KV cache bytes per sequence (fp32) after `context_len` tokens: at most sinks + window tokens."""
        return 2 * self.n_kv * self.head_dim * self.cache_tokens(context_len) * FP32_BYTES

    def flops_per_token(self, context_len: int) -> int:
        """Forward FLOPs of one token attending to its min(context_len, sinks + window) cached keys."""
        return super().flops_per_token(self.cache_tokens(context_len))
