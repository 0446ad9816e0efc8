"""The shared block: x + mixer(norm(x)), then x + ffn(norm(x)). Both slots come from the registry."""

from __future__ import annotations

import jax
from flax import nnx

from cfm_jax import registry
from cfm_jax.layers.common import RMSNorm, make_aux
from cfm_jax.layers.contracts import ExpertFFN
from cfm_jax.registry import LayerContext, SlotConfig


class Block(nnx.Module):
    def __init__(self, mixer: SlotConfig, ffn: SlotConfig | None, ctx: LayerContext, norm_eps: float, *,
                 rngs: nnx.Rngs):
        """ffn None: a mixer-only block, x + mixer(norm(x)) (model.use_ffn=false)."""
        self.mixer_norm = RMSNorm(ctx.d_model, epsilon=norm_eps, rngs=rngs)
        self.mixer = registry.build(mixer, ctx, rngs)
        self.ffn_norm = None if ffn is None else RMSNorm(ctx.d_model, epsilon=norm_eps, rngs=rngs)
        self.ffn = None if ffn is None else registry.build(ffn, ctx, rngs)

    def __call__(self, x: jax.Array, neuron_hook=None):
        """x: (batch, seq, d_model) -> (x, {"mixer": aux, "ffn": aux}).

        neuron_hook (analysis only): a -> a' applied to the FFN's intermediate activations, computing
        the FFN as down(hook(hidden(x))) for an FFN with neurons (`hidden`, `down`), or to its
        per-expert combine weights for an FFN with `expert_forward` (MoE, expert granularity).
        """
        h, mixer_aux = self.mixer(self.mixer_norm(x))
        x = x + h
        if self.ffn is None:
            return x, {"mixer": mixer_aux}
        if neuron_hook is None:
            h, ffn_aux = self.ffn(self.ffn_norm(x))
        elif isinstance(self.ffn, ExpertFFN):
            h, ffn_aux = self.ffn.expert_forward(self.ffn_norm(x), neuron_hook), make_aux()
        else:
            h, ffn_aux = self.ffn.down(neuron_hook(self.ffn.hidden(self.ffn_norm(x)))), make_aux()
        return x + h, {"mixer": mixer_aux, "ffn": ffn_aux}

    def step(self, x: jax.Array, state):
        """One token. x: (batch, d_model) -> (x, new mixer state)."""
        h, state = self.mixer.step(self.mixer_norm(x), state)
        x = x + h
        if self.ffn is None:
            return x, state
        h, _ = self.ffn(self.ffn_norm(x)[:, None, :])
        return x + h[:, 0, :], state
