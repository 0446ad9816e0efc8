"""Mixer `linear_attention`: kernelized causal linear attention (Katharopoulos et al. 2020; Based).

Per head, with a feature map phi on queries and keys:

    S_t = S_{t-1} + phi(k_t) v_t^T        o_t = S_t^T phi(q_t)        (S: feature_dim x head_dim)

Training uses the chunked form (inter-chunk state + masked intra-chunk scores, `chunked_linear_attention`;
for the taylor map `taylor_linear_attention`, whose intra-chunk scores come from q.k without the
1 + d + d^2 features), decoding the recurrent form (`recurrent_step`); `linear_attention_reference` is the plain scan over
time both are tested against. Normalization "sum" divides by phi(q_t) . sum_{s<=t} phi(k_s), computed by
the same kernel on an extra all-ones value column, so the state is feature_dim x (head_dim + 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from cfm_jax.errors import UserError
from cfm_jax.layers.attention import FP32_BYTES
from cfm_jax.layers.common import RMSNorm, linear, make_aux, normal_init, output_init
from cfm_jax.layers.short_conv import ShortConv
from cfm_jax.registry import LayerContext, SlotConfig, register

FeatureMap = Literal["elu1", "identity", "taylor"]
SUM_EPS = 1e-6  # guards the "sum" denominator against underflow only (positive feature maps)


@dataclass(frozen=True)
class LinearAttentionConfig(SlotConfig):
    n_heads: int = 4  # heads; value head_dim = d_model // n_heads
    d_key: int = 0  # query/key dims per head before the feature map; 0 = head_dim (Based: 16 with taylor)
    # phi: elu1 = elu(x)+1 (Katharopoulos); identity = x; taylor = [1, x/d^(1/4), x(x)x/sqrt(2d)]
    # (Based: phi(q).phi(k) = 1 + q.k/sqrt(d) + (q.k)^2/(2d), feature_dim 1 + d + d^2)
    feature_map: FeatureMap = "elu1"
    # sum = divide by phi(q_t).sum phi(k) (needs a positive map); rms = RMSNorm per head on the output;
    # none = raw o_t
    normalize: Literal["sum", "rms", "none"] = "sum"
    chunk_size: int = 64  # tokens per chunk of the training form (any length works; tail is padded)
    conv_size: int = 0  # taps of a causal depthwise conv (+ SiLU) on q, k, v before the feature map; 0 = none

    def key_dim(self, d_model: int) -> int:
        return self.d_key or d_model // self.n_heads

    def feature_dim(self, d_model: int) -> int:
        dk = self.key_dim(d_model)
        return 1 + dk + dk * dk if self.feature_map == "taylor" else dk

    def value_dim(self, d_model: int) -> int:
        """Columns of the state: head_dim, plus one for the "sum" normalizer."""
        return d_model // self.n_heads + (self.normalize == "sum")

    def param_count(self, d_model: int) -> int:
        hd, dk = d_model // self.n_heads, self.key_dim(d_model)
        norm = hd if self.normalize == "rms" else 0
        conv = (self.conv_size + 1) * self.n_heads * (2 * dk + hd) if self.conv_size else 0
        return d_model * self.n_heads * (2 * dk + hd) + self.n_heads * hd * d_model + norm + conv

    def validate(self, d_model: int) -> None:
        if self.n_heads < 1 or d_model % self.n_heads:
            raise UserError(f"model.mixer.n_heads={self.n_heads} must be >= 1 and divide model.d_model={d_model}")
        if self.d_key < 0:
            raise UserError(f"model.mixer.d_key={self.d_key} must be >= 1 (0 = head_dim)")
        if self.chunk_size < 1:
            raise UserError(f"model.mixer.chunk_size={self.chunk_size} must be >= 1")
        if self.conv_size < 0:
            raise UserError(f"model.mixer.conv_size={self.conv_size} must be >= 0 (0 = no short conv)")
        if self.normalize == "sum" and self.feature_map == "identity":
            raise UserError("model.mixer.normalize=sum needs a positive feature map (elu1, taylor), not identity")


def feature_map(x: jax.Array, kind: FeatureMap) -> jax.Array:
    """x: (..., d) -> (..., F) with F = d, or 1 + d + d^2 for taylor."""
    if kind == "elu1":
        return jax.nn.elu(x) + 1.0
    if kind == "identity":
        return x
    d = x.shape[-1]
    outer = (x[..., :, None] * x[..., None, :]).reshape(*x.shape[:-1], d * d)
    ones = jnp.ones((*x.shape[:-1], 1), x.dtype)
    return jnp.concatenate([ones, x / d**0.25, outer / (2.0 * d) ** 0.5], axis=-1)


def recurrent_step(state: jax.Array, q: jax.Array, k: jax.Array, v: jax.Array):
    """One token. state: (B, H, F, D); q, k: (B, H, F); v: (B, H, D) -> (new state, o: (B, H, D))."""
    state = state + k[..., :, None] * v[..., None, :]
    return state, jnp.einsum("bhf,bhfd->bhd", q, state)


def linear_attention_reference(q, k, v, state=None):
    """Plain lax.scan over time. q, k: (B, L, H, F); v: (B, L, H, D); state: (B, H, F, D) or None.
    Returns (o: (B, L, H, D), final state). fp32 throughout."""
    q, k, v = (t.astype(jnp.float32) for t in (q, k, v))
    if state is None:
        state = jnp.zeros((q.shape[0], q.shape[2], q.shape[3], v.shape[3]), jnp.float32)
    time_major = lambda t: jnp.moveaxis(t, 1, 0)
    state, o = jax.lax.scan(lambda s, x: recurrent_step(s, *x), state, (time_major(q), time_major(k), time_major(v)))
    return jnp.moveaxis(o, 0, 1), state


def _chunked(q, k, v, chunk: int, state, with_state: bool, scores, features):
    """The chunked scan both training forms share. q, k: (B, L, H, X) as the caller takes them; v: (B, L,
    H, D). Within a chunk o = features(q) S_prev + tril(scores(q, k)) v, with scores: (B, c, H, X) x2 ->
    (B, H, c, c) and features: (..., X) -> (..., F), the state's side. Zero-padded tail values add nothing
    to the state, whatever the padded keys' features. A sequence of one chunk from no state whose final
    state is not wanted skips the state and the features altogether."""
    q, k, v = (t.astype(jnp.float32) for t in (q, k, v))
    b, length, h, _ = q.shape
    d = v.shape[-1]
    c = min(chunk, length)
    n = -(-length // c)
    pad = ((0, 0), (0, n * c - length), (0, 0), (0, 0))
    causal = jnp.tril(jnp.ones((c, c), bool))

    def intra(qc, kc, vc):
        return jnp.einsum("bhij,bjhd->bihd", jnp.where(causal, scores(qc, kc), 0.0), vc)

    if state is None and n == 1 and not with_state:
        return intra(*(jnp.pad(t, pad) for t in (q, k, v)))[:, :length], None
    if state is None:
        state = jnp.zeros((b, h, jax.eval_shape(features, q[:, :1]).shape[-1], d), jnp.float32)

    def chunks(t):  # (B, L, H, X) -> (n, B, c, H, X)
        return jnp.moveaxis(jnp.pad(t, pad).reshape(b, n, c, h, t.shape[-1]), 1, 0)

    def body(s, inputs):
        qc, kc, vc = inputs
        o = jnp.einsum("bihf,bhfd->bihd", features(qc), s) + intra(qc, kc, vc)
        return s + jnp.einsum("bjhf,bjhd->bhfd", features(kc), vc), o

    state, o = jax.lax.scan(body, state, (chunks(q), chunks(k), chunks(v)))
    return jnp.moveaxis(o, 0, 1).reshape(b, n * c, h, d)[:, :length], state if with_state else None


def chunked_linear_attention(q, k, v, chunk: int, state=None):
    """Chunked form, same signature and result as `linear_attention_reference`.

    A lax.scan over chunks of `chunk` tokens carries S; within a chunk, o = q S_prev + tril(q k^T) v,
    on feature-mapped q and k.
    """
    return _chunked(q, k, v, chunk, state, True, lambda qc, kc: jnp.einsum("bihf,bjhf->bhij", qc, kc), lambda x: x)


def taylor_linear_attention(q, k, v, chunk: int, state=None, with_state: bool = True):
    """`chunked_linear_attention` with the taylor feature map applied inside: q, k (B, L, H, dk) before
    the map, v (B, L, H, D); state (B, H, 1 + dk + dk^2, D) or None. Returns (o: (B, L, H, D), final
    state, or None when not with_state).

    Why: within a chunk phi(q).phi(k) = 1 + q.k/sqrt(dk) + (q.k)^2/(2 dk) comes from q.k itself, so the
    1 + dk + dk^2 features (273 at Based's dk = 16) are built only for the carried state, and not at all
    for a sequence of one chunk that starts from no state and whose final state is not wanted (an
    MQAR training step): Based's layer at 64 x 64 tokens, d_model 64, forward + backward 108.5 -> 9.6 ms,
    mqar_capacity's based-d64 training step 233 -> 75 ms (d_model 256: 421 -> 280 ms).
    """
    dk = q.shape[-1]

    def scores(qc, kc):
        dots = jnp.einsum("bihe,bjhe->bhij", qc, kc)
        return 1.0 + dots * dk**-0.5 + dots * dots / (2.0 * dk)

    return _chunked(q, k, v, chunk, state, with_state, scores, lambda x: feature_map(x, "taylor"))


@register("mixer", "linear_attention", LinearAttentionConfig)
class LinearAttention(nnx.Module):
    def __init__(self, cfg: LinearAttentionConfig, ctx: LayerContext, *, rngs: nnx.Rngs):
        self.cfg, d = cfg, ctx.d_model
        self.n_heads, self.head_dim, self.d_key = cfg.n_heads, d // cfg.n_heads, cfg.key_dim(d)
        self.feature_dim, self.value_dim = cfg.feature_dim(d), cfg.value_dim(d)
        init = normal_init(ctx.init_std)
        self.q_proj = linear(d, self.n_heads * self.d_key, init, rngs)
        self.k_proj = linear(d, self.n_heads * self.d_key, init, rngs)
        self.v_proj = linear(d, self.n_heads * self.head_dim, init, rngs)
        self.o_proj = linear(self.n_heads * self.head_dim, d, output_init(ctx), rngs)
        self.out_norm = RMSNorm(self.head_dim, rngs=rngs) if cfg.normalize == "rms" else None
        channels = self.n_heads * (2 * self.d_key + self.head_dim)
        self.conv = ShortConv(channels, cfg.conv_size, rngs=rngs) if cfg.conv_size else None

    def _project(self, x: jax.Array) -> jax.Array:
        """x: (..., d_model) -> q, k, v projections side by side: (..., H (2 d_key + head_dim))."""
        return jnp.concatenate([self.q_proj(x), self.k_proj(x), self.v_proj(x)], axis=-1)

    def _split(self, qkv: jax.Array):
        """qkv: (..., H (2 d_key + head_dim)) -> q, k: (..., H, d_key) fp32 before the feature map;
        v: (..., H, value_dim) fp32."""
        lead, h, dk = qkv.shape[:-1], self.n_heads, self.d_key
        q = qkv[..., :h * dk].reshape(*lead, h, dk).astype(jnp.float32)
        k = qkv[..., h * dk:2 * h * dk].reshape(*lead, h, dk).astype(jnp.float32)
        v = qkv[..., 2 * h * dk:].reshape(*lead, h, self.head_dim).astype(jnp.float32)
        if self.cfg.normalize == "sum":  # the ones column accumulates the normalizer sum phi(k)
            v = jnp.concatenate([v, jnp.ones((*lead, h, 1), jnp.float32)], axis=-1)
        return q, k, v

    def _features(self, qkv: jax.Array):
        """qkv: (..., H (2 d_key + head_dim)) -> phi(q), phi(k): (..., H, F) fp32; v: (..., H, value_dim) fp32."""
        q, k, v = self._split(qkv)
        q, k = feature_map(q, self.cfg.feature_map), feature_map(k, self.cfg.feature_map)
        if self.cfg.feature_map != "taylor":  # taylor carries its own 1/sqrt(d) scaling
            q = q * self.d_key**-0.5
        return q, k, v

    def _readout(self, o: jax.Array, dtype) -> jax.Array:
        """o: (..., H, value_dim) fp32 -> (..., d_model)."""
        if self.cfg.normalize == "sum":
            o = o[..., :-1] / (o[..., -1:] + SUM_EPS)
        elif self.cfg.normalize == "rms":
            o = self.out_norm(o)
        return self.o_proj(o.reshape(*o.shape[:-2], self.n_heads * self.head_dim).astype(dtype))

    def __call__(self, x: jax.Array):
        """x: (batch, seq, d_model) -> (y: (batch, seq, d_model), aux)."""
        qkv = self._project(x)
        if self.conv is not None:
            qkv = self.conv(qkv)
        if self.cfg.feature_map == "taylor":  # scores from q.k, features only for a carried state
            o, _ = taylor_linear_attention(*self._split(qkv), self.cfg.chunk_size, with_state=False)
        else:
            o, _ = chunked_linear_attention(*self._features(qkv), self.cfg.chunk_size)
        return self._readout(o, x.dtype), make_aux()

    # --- decoding ---

    def init_state(self, batch: int, max_len: int) -> dict:
        """Recurrent state S: (batch, heads, feature_dim, value_dim) fp32 (+ the conv's last inputs);
        independent of max_len."""
        state = {"S": jnp.zeros((batch, self.n_heads, self.feature_dim, self.value_dim), jnp.float32)}
        if self.conv is not None:
            state["conv"] = self.conv.init_state(batch)
        return state

    def step(self, x: jax.Array, state: dict):
        """One token. x: (batch, d_model) -> (y: (batch, d_model), new state)."""
        qkv, new = self._project(x), {}
        if self.conv is not None:
            qkv, new["conv"] = self.conv.step(qkv, state["conv"])
        s, o = recurrent_step(state["S"], *self._features(qkv))
        return self._readout(o, x.dtype), {"S": s, **new}

    # --- accounting ---

    def state_bytes(self, context_len: int) -> int:
        """Recurrent state bytes per sequence (fp32): heads * feature_dim * value_dim (+ the conv's
        last inputs), any context."""
        conv = self.conv.state_bytes() if self.conv is not None else 0
        return self.n_heads * self.feature_dim * self.value_dim * FP32_BYTES + conv

    def flops_per_token(self, context_len: int) -> int:
        """Forward FLOPs of one decoding token: projections + state update + readout (no context term)."""
        d = self.q_proj.in_features
        projections = 2 * d * self.n_heads * (2 * self.d_key + self.head_dim) + 2 * self.n_heads * self.head_dim * d
        taylor = 2 * self.n_heads * self.d_key**2 if self.cfg.feature_map == "taylor" else 0  # q and k outer products
        conv = 2 * self.cfg.conv_size * self.n_heads * (2 * self.d_key + self.head_dim)
        return projections + taylor + conv + 2 * 2 * self.n_heads * self.feature_dim * self.value_dim


@dataclass(frozen=True)
class BasedConfig(LinearAttentionConfig):
    """Based's linear attention (Arora et al. 2024): a 2nd-order Taylor feature map on 16-dim queries
    and keys (feature dim 1 + 16 + 256), normalized by phi(q) . sum phi(k), after a short causal conv.
    The Based architecture pairs it with small sliding-window attention layers: `model.layers=based`
    (the preset) alternates this kind, `based_linear`, with `sliding_window` (window set by
    model.mixers.sliding_window.window, Based uses 64)."""

    d_key: int = 16
    feature_map: FeatureMap = "taylor"
    conv_size: int = 3


@register("mixer", "based_linear", BasedConfig)
class Based(LinearAttention):
    """`linear_attention` with Based's defaults (BasedConfig); same forms, state and references."""
