"""The shared block: x + mixer(norm(x)), then x + ffn(norm(x)). Both slots come from the registry."""

from __future__ import annotations

import jax
from flax import nnx

from cfm_jax import registry
from cfm_jax.registry import LayerContext, SlotConfig


class Block(nnx.Module):
    def __init__(self, mixer: SlotConfig, ffn: SlotConfig, ctx: LayerContext, norm_eps: float, *, rngs: nnx.Rngs):
        self.mixer_norm = nnx.RMSNorm(ctx.d_model, epsilon=norm_eps, rngs=rngs)
        self.mixer = registry.build(mixer, ctx, rngs)
        self.ffn_norm = nnx.RMSNorm(ctx.d_model, epsilon=norm_eps, rngs=rngs)
        self.ffn = registry.build(ffn, ctx, rngs)

    def __call__(self, x: jax.Array):
        """x: (batch, seq, d_model) -> (x, {"mixer": aux, "ffn": aux})."""
        h, mixer_aux = self.mixer(self.mixer_norm(x))
        x = x + h
        h, ffn_aux = self.ffn(self.ffn_norm(x))
        return x + h, {"mixer": mixer_aux, "ffn": ffn_aux}

    def step(self, x: jax.Array, state):
        """One token. x: (batch, d_model) -> (x, new mixer state)."""
        h, state = self.mixer.step(self.mixer_norm(x), state)
        x = x + h
        h, _ = self.ffn(self.ffn_norm(x)[:, None, :])
        return x + h[:, 0, :], state
