"""Small shared pieces: the aux dict every slot returns, initializers, RoPE."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from cfm_jax import policy
from cfm_jax.kernels.cblas import matmul

# Modules whose training-time behaviour differs from evaluation (e.g. updating a router bias) keep a
# `self.deterministic = True` attribute: the trainer calls `model.train()` (sets it False) and
# evaluation `model.eval()`, the NNX convention used by Dropout.
#
# Every slot module returns (y, aux) with aux = {"loss": scalar, "stats": {name: scalar}}.
# "loss" is added to the training loss; "stats" are logged per layer and averaged over layers.
Aux = dict


class TrainingStep(nnx.Variable):
    """Non-trainable int32 scalar that the trainer sets to the current optimizer step before each
    forward pass, for modules whose behaviour follows a schedule (e.g. an L1 coefficient)."""


def training_step_variable() -> TrainingStep:
    return TrainingStep(jnp.zeros((), jnp.int32))


def make_aux(loss: jax.Array | float = 0.0, **stats: jax.Array) -> Aux:
    return {"loss": jnp.asarray(loss, jnp.float32), "stats": dict(stats)}


def normal_init(std: float):
    return nnx.initializers.normal(stddev=std)


def output_init(ctx) -> nnx.Initializer:
    """GPT-2 style: residual-branch output projections get std / sqrt(2 * n_layers)."""
    return normal_init(ctx.init_std / (2 * ctx.n_layers) ** 0.5)


class Linear(nnx.Linear):
    """nnx.Linear that multiplies a 2-D view of its input: x (..., d_in) -> (..., d_out).

    Same parameters (kernel, optional bias) and result as nnx.Linear, up to float rounding where the
    product runs in MKL (its `dot_general`, `precision`
    and `preferred_element_type` options are not used). Why: on XLA:CPU the weight gradient of a
    (batch, seq, d) input contracts two axes, which compiles to transposes plus a slow dot; flattening
    to (batch * seq, d) first made a transformer training step ~1.4x faster here, and the 2-D product
    can run in MKL (`cfm_jax.kernels.cblas.matmul`; experiments/results/bench.md).
    """

    def __call__(self, x: jax.Array) -> jax.Array:
        bias = self.bias[...] if self.bias is not None else None
        x, kernel, bias = self.promote_dtype((x, self.kernel[...], bias), dtype=self.dtype)
        y = matmul(x.reshape(-1, x.shape[-1]), kernel)
        if bias is not None:
            y = y + bias
        return y.reshape(*x.shape[:-1], -1)


class RMSNorm(nnx.RMSNorm):
    """nnx.RMSNorm on a 2-D view of its input, with a hand-written backward pass: x (..., d) -> (..., d).

    Same parameter (scale) and result as nnx.RMSNorm (statistics in float32). Why the 2-D view: on
    XLA:CPU the backward pass of a (1, seq, d) input fused the row reduction into a loop that
    recomputed it per element, 6x slower than at (seq, d) (seq 16384, d 512: 0.30 s vs 0.05 s). Why
    the backward (`rms_norm`): autodiff's version made XLA write the scale broadcast to every row
    out to memory and read it back, twice per norm. Off the CPU and under CFM_JAX_MATMUL=xla it is
    flax's, plain autodiff, so forward-mode differentiation works (cfm_jax.policy.hand_written_vjps).
    """

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        # The result keeps x's dtype: a float32 scale must not lift bfloat16 activations (model.dtype)
        # back to float32, which would run every following matmul in float32.
        if mask is not None or self.scale is None or not policy.hand_written_vjps():  # plain autodiff (forward mode too)
            flat_mask = None if mask is None else mask.reshape(-1, mask.shape[-1])
            y = super().__call__(x.reshape(-1, x.shape[-1]), flat_mask).reshape(x.shape)
            return y.astype(x.dtype) if self.dtype is None else y
        if self.dtype is not None:
            x = x.astype(self.dtype)
        return rms_norm(x.reshape(-1, x.shape[-1]), self.scale[...], self.epsilon).reshape(x.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """x (n, d) * rsqrt(mean(x^2, row) + eps) * scale (d,), computed in float32, in x's dtype."""
    return _rms_norm_fwd(x, scale, eps)[0]


def _rms_norm_fwd(x, scale, eps):
    xf = x.astype(jnp.float32)
    r = jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)  # (n, 1)
    return (xf * r * scale.astype(jnp.float32)).astype(x.dtype), (x, scale, r)


def _rms_norm_bwd(eps, res, g):
    """y = x r w with r = (mean(x^2) + eps)^-1/2: dx = r (g w - x r^2 mean(g w x)), dw = sum_rows g x r."""
    x, scale, r = res
    xf, gf = x.astype(jnp.float32), g.astype(jnp.float32)
    gw = gf * scale.astype(jnp.float32)
    dx = r * (gw - xf * (r * r) * jnp.mean(gw * xf, axis=-1, keepdims=True))
    dscale = jnp.sum(gf * xf * r, axis=0)
    return dx.astype(x.dtype), dscale.astype(scale.dtype)


rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


def linear(d_in: int, d_out: int, init, rngs: nnx.Rngs) -> nnx.Linear:
    return Linear(d_in, d_out, use_bias=False, kernel_init=init, rngs=rngs)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding (rotate-half form).

    x: (batch, seq, heads, head_dim) with even head_dim; positions: (seq,) or (batch, seq) ints.
    """
    half = x.shape[-1] // 2
    freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)  # (half,)
    angles = positions[..., None].astype(jnp.float32) * freqs  # (..., seq, half)
    if angles.ndim == 2:
        angles = angles[None]
    cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]  # (b|1, seq, 1, half)
    # [x1 c - x2 s, x2 c + x1 s] written as x [c, c] + [x2, x1] [-s, s]: one pass over x in XLA,
    # where concatenating the two computed halves took two passes and a copy.
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], 2, half)  # [x1, x2]
    cos2, sin2 = jnp.stack([cos, cos], axis=-2), jnp.stack([-sin, sin], axis=-2)  # (b|1, seq, 1, 2, half)
    out = pairs * cos2 + jnp.flip(pairs, axis=-2) * sin2
    return out.reshape(x.shape).astype(x.dtype)
