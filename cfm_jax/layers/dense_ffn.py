"""FFN `dense`: SwiGLU (default), GELU or ReLU feed-forward; every neuron computed for every token."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from cfm_jax import policy
from cfm_jax.errors import UserError
from cfm_jax.layers.activation_stats import activation_stats
from cfm_jax.kernels.cblas import matmul
from cfm_jax.layers.common import linear, make_aux, normal_init, output_init
from cfm_jax.registry import LayerContext, SlotConfig, register


@dataclass(frozen=True)
class DenseFFNConfig(SlotConfig):
    activation: Literal["swiglu", "gelu", "relu"] = "swiglu"  # swiglu = silu(x W_g) * (x W_u)
    # Hidden width; 0 = 4*d_model for gelu/relu, 8/3*d_model rounded up to a multiple of 8 for swiglu
    # (the same parameter count: swiglu has three matrices instead of two).
    d_ff: int = 0

    def width(self, d_model: int) -> int:
        if self.d_ff:
            return self.d_ff
        if self.activation == "swiglu":
            return -(-(8 * d_model // 3) // 8) * 8
        return 4 * d_model

    def validate(self, d_model: int) -> None:
        if self.d_ff < 0:
            raise UserError(f"model.ffn.d_ff={self.d_ff} must be >= 0 (0 = default width)")


def swiglu_reference(gu: jax.Array) -> jax.Array:
    """gu (n, 2f) = [g, u] -> silu(g) * u (n, f), differentiated by autodiff."""
    f = gu.shape[-1] // 2
    return jax.nn.silu(gu[:, :f]) * gu[:, f:]


@jax.custom_vjp
def swiglu(gu: jax.Array) -> jax.Array:
    """`swiglu_reference` with a hand-written backward pass. Why: from autodiff's version XLA:CPU
    wrote sigmoid(g) and silu(g) out as residuals in the forward pass; here the forward keeps only gu
    (the matmul's output) and the backward recomputes the sigmoid (step 30-60 ms faster of ~2.4 s at
    the cpu benchmark's shape, measured side by side)."""
    return swiglu_reference(gu)


def _swiglu_fwd(gu):
    return swiglu_reference(gu), gu


def _swiglu_bwd(gu, dh):
    """d/dg silu(g) u = u s (1 + g (1 - s)) with s = sigmoid(g); d/du = silu(g) = g s."""
    f = dh.shape[-1]
    g, u = gu[:, :f], gu[:, f:]
    s = jax.nn.sigmoid(g)
    return (jnp.concatenate([dh * u * s * (1 + g * (1 - s)), dh * g * s], axis=1),)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


@register("ffn", "dense", DenseFFNConfig)
class DenseFFN(nnx.Module):
    # Its activation_ratio statistic is descriptive: a dense kernel reads every weight for every
    # token, so the accounting ignores it (the contract test asks every other FFN that reports a
    # ratio to count by it).
    counts_dense = True
    def __init__(self, cfg: DenseFFNConfig, ctx: LayerContext, *, rngs: nnx.Rngs):
        self.activation = cfg.activation
        d, f = ctx.d_model, cfg.width(ctx.d_model)
        init = normal_init(ctx.init_std)
        self.up = linear(d, f, init, rngs)
        self.gate = linear(d, f, init, rngs) if cfg.activation == "swiglu" else None
        self.down = linear(f, d, output_init(ctx), rngs)

    def hidden(self, x: jax.Array) -> jax.Array:
        """x: (..., d_model) -> intermediate activations (..., d_ff)."""
        if self.activation == "swiglu":  # gate and up in one matmul (faster on a CPU); same result
            f = self.up.out_features
            w = jnp.concatenate([self.gate.kernel[...], self.up.kernel[...]], axis=1)
            gu = matmul(x.reshape(-1, x.shape[-1]), w)
            act = swiglu if policy.hand_written_vjps() else swiglu_reference  # else plain autodiff (forward mode too)
            return act(gu).reshape(*x.shape[:-1], f)
        if self.activation == "gelu":
            return jax.nn.gelu(self.up(x))
        return jax.nn.relu(self.up(x))

    def __call__(self, x: jax.Array):
        """x: (batch, seq, d_model) -> (y: (batch, seq, d_model), aux with sparsity statistics).

        The statistics are the neuron-sparse FFN's (activation ratio etc.), so a dense ReLU FFN is
        measured on the same footing; for SwiGLU/GELU nearly every neuron is nonzero.
        """
        h = self.hidden(x)
        return self.down(h), make_aux(**activation_stats(h))

    def flops_per_token(self) -> int:
        """Forward FLOPs per token (2 per multiply-add)."""
        return 2 * self.param_count()

    def param_count(self) -> int:
        n_in = 2 if self.gate is not None else 1
        return (n_in + 1) * self.up.in_features * self.up.out_features

    def active_params_per_token(self) -> int:
        """Every weight is used for every token."""
        return self.param_count()
