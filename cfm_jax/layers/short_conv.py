"""A short causal depthwise convolution over the sequence, the token mixing that the published Based,
GLA (flash-linear-attention's `use_short_conv`) and Mamba blocks put in front of their recurrence:

    y_t = silu(sum_{j=0}^{K-1} w_j * x_{t-K+1+j} + b)        (per channel; x_{<0} = 0)

It lets a key token see its neighbours before it is written into the state, which is known to matter
for associative recall (Zoology, Based). Decoding keeps the last K - 1 inputs.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx


def short_conv_reference(x: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
    """Obviously right: per channel, numpy-style full convolution truncated to the causal part.
    x: (B, L, C); w: (K, C) with w[K-1] on the current token; b: (C,) -> silu(conv): (B, L, C)."""
    K, L = w.shape[0], x.shape[1]
    per_channel = jax.vmap(lambda xc, wc: jnp.convolve(xc, wc[::-1])[:L], in_axes=(-1, -1), out_axes=-1)
    return jax.nn.silu(jax.vmap(per_channel, in_axes=(0, None))(x, w) + b)


class ShortConv(nnx.Module):
    """x: (batch, seq, channels) -> (batch, seq, channels): causal depthwise conv of `size` taps + SiLU."""

    def __init__(self, channels: int, size: int, *, rngs: nnx.Rngs):
        bound = 1 / math.sqrt(size)  # PyTorch's Conv1d default, as the reference implementations use
        self.size = size
        self.w = nnx.Param(jax.random.uniform(rngs.params(), (size, channels), minval=-bound, maxval=bound))
        self.b = nnx.Param(jax.random.uniform(rngs.params(), (channels,), minval=-bound, maxval=bound))

    def __call__(self, x: jax.Array) -> jax.Array:
        K, L = self.size, x.shape[1]
        padded = jnp.pad(x, ((0, 0), (K - 1, 0), (0, 0)))
        taps = sum(padded[:, j:j + L] * self.w[j].astype(x.dtype) for j in range(K))
        return jax.nn.silu(taps + self.b[...].astype(x.dtype))

    def init_state(self, batch: int, dtype=jnp.float32) -> jax.Array:
        """The last size - 1 inputs: (batch, size - 1, channels), zeros."""
        return jnp.zeros((batch, self.size - 1, self.w.shape[1]), dtype)

    def step(self, x: jax.Array, state: jax.Array) -> tuple[jax.Array, jax.Array]:
        """One token. x: (batch, channels); state from init_state -> (y: (batch, channels), new state)."""
        window = jnp.concatenate([state, x[:, None].astype(state.dtype)], axis=1)  # (batch, size, channels)
        y = jax.nn.silu(jnp.einsum("bkc,kc->bc", window, self.w[...]) + self.b[...])
        return y.astype(x.dtype), window[:, 1:]

    def state_bytes(self) -> int:
        """fp32 bytes of the decoding state per sequence."""
        return (self.size - 1) * self.w.shape[1] * 4
