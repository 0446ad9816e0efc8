"""Mixer `mamba`: the Mamba-1 selective SSM block (Gu & Dao 2023, arXiv 2312.00752; mamba_ssm's
`Mamba` module and `selective_scan_ref`).

    x, z = in_proj(u)                      (d_inner each; z is the gate)
    x = silu(causal depthwise conv(x))     (d_conv taps)
    dt, B, C = x_proj(x);  dt = softplus(dt_proj(dt))          (dt: d_inner; B, C: d_state)
    h_t = exp(dt_t A) * h_{t-1} + dt_t B_t x_t    y_t = C_t . h_t + D x_t    (h: d_inner x d_state)
    out = out_proj(y * silu(z))

A = -exp(A_log) is diagonal and real (S4D-real init A_log = log(1..N)). Training runs
`selective_scan_chunked` (outer lax.scan over chunks carrying h, each chunk rematerialized in the
backward pass, so (batch, L, d_inner, d_state) never exists for the whole sequence; inside a chunk a
sequential scan (a hand-written backward pass, every reduction batched over the chunk) or an
associative one: `scan=auto` takes the sequential one on XLA:CPU, where it is ~3x faster, and the
log-depth associative one on accelerators); decoding runs `selective_step` and
carries the last d_conv - 1 conv inputs and h.
`selective_scan_reference` is the plain scan over time both are tested against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from baselines.gated_linear_attention import check_threshold, from_chunks, horizon, to_chunks
from cfm_jax import policy
from cfm_jax.errors import UserError
from cfm_jax.kernels import selective_scan as scan_kernel
from cfm_jax.layers.attention import FP32_BYTES
from cfm_jax.layers.common import Linear, linear, make_aux, normal_init, output_init
from cfm_jax.registry import LayerContext, SlotConfig, register


@dataclass(frozen=True)
class MambaConfig(SlotConfig):
    expand: int = 2  # d_inner = expand * d_model
    d_state: int = 16  # N: SSM state size per inner channel
    d_conv: int = 4  # taps of the causal depthwise conv before the SSM
    dt_rank: int = 0  # rank of the dt projection; 0 = ceil(d_model / 16)
    dt_min: float = 1e-3  # dt at init is log-uniform in [dt_min, dt_max] (through the dt_proj bias)
    dt_max: float = 0.1  # upper end of that range
    dt_init_floor: float = 1e-4  # lower clamp of the initial dt
    chunk_size: int = 128  # tokens per chunk of the training scan, at most (see chunk_length; tail is padded)
    scan: str = "auto"  # "kernel" (C++, CPU), chunks scanned "sequential" or "associative" (log depth), or "auto" (see pick_scan)

    def inner(self, d_model: int) -> int:
        return self.expand * d_model

    def rank(self, d_model: int) -> int:
        return self.dt_rank or math.ceil(d_model / 16)

    def validate(self, d_model: int) -> None:
        for name in ("expand", "d_state", "d_conv", "chunk_size"):
            if getattr(self, name) < 1:
                raise UserError(f"model.mixer.{name}={getattr(self, name)} must be >= 1")
        if self.scan not in ("auto", *SCANS, KERNEL):
            raise UserError(f"model.mixer.scan={self.scan!r} is not one of {['auto', *SCANS, KERNEL]}")
        if self.dt_rank < 0:
            raise UserError(f"model.mixer.dt_rank={self.dt_rank} must be >= 1 (or 0 = ceil(d_model/16))")
        if not 0 < self.dt_min <= self.dt_max:
            raise UserError(f"model.mixer.dt_min={self.dt_min}, dt_max={self.dt_max}: need 0 < dt_min <= dt_max")
        if self.dt_init_floor <= 0:
            raise UserError(f"model.mixer.dt_init_floor={self.dt_init_floor} must be > 0")

    def param_count(self, d_model: int) -> int:
        """Parameters of one layer: in_proj, conv (+bias), x_proj, dt_proj (+bias), A_log, D, out_proj."""
        E, N, R, K = self.inner(d_model), self.d_state, self.rank(d_model), self.d_conv
        return d_model * 2 * E + E * (K + 1) + E * (R + 2 * N) + (R + 1) * E + E * N + E + E * d_model


# --- the selective scan ---


def selective_step(h: jax.Array, u: jax.Array, dt: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array):
    """One token. h: (b, E, N) fp32; u, dt: (b, E); A: (E, N); B, C: (b, N). Returns (y: (b, E), h)."""
    h = jnp.exp(dt[..., None] * A) * h + (dt * u)[..., None] * B[:, None, :]
    return jnp.einsum("ben,bn->be", h, C), h


def _prepare(u, dt, B, C, h0, A):
    u, dt, B, C = (a.astype(jnp.float32) for a in (u, dt, B, C))
    if h0 is None:
        h0 = jnp.zeros((u.shape[0], *A.shape), jnp.float32)
    return u, dt, B, C, h0.astype(jnp.float32)


def selective_scan_reference(u, dt, A, B, C, h0=None):
    """Plain lax.scan over time. u, dt: (b, L, E); A: (E, N); B, C: (b, L, N); h0: (b, E, N) or None.
    Returns (y: (b, L, E) fp32, without the D skip and gate; final h: (b, E, N) fp32)."""
    u, dt, B, C, h0 = _prepare(u, dt, B, C, h0, A)

    def step(h, inputs):
        y, h = selective_step(h, *inputs[:2], A, *inputs[2:])
        return h, y

    h, y = jax.lax.scan(step, h0, tuple(jnp.moveaxis(a, 1, 0) for a in (u, dt, B, C)))
    return jnp.moveaxis(y, 0, 1), h


def _combine(earlier, later):
    """Compose h -> a1 h + b1 then h -> a2 h + b2."""
    a1, b1 = earlier
    a2, b2 = later
    return a1 * a2, a2 * b1 + b2


def _associative_chunk(h, inputs, A):
    """h: (b, E, N); inputs u, dt: (b, T, E), B, C: (b, T, N) -> (h at the chunk end, y: (b, T, E))."""
    u, dt, B, C = inputs
    a = jnp.exp(dt[..., None] * A)  # (b, T, E, N), in (0, 1]
    b = (dt * u)[..., None] * B[:, :, None, :]
    b = b.at[:, 0].add(a[:, 0] * h)  # fold the carried state into the first step
    _, hs = jax.lax.associative_scan(_combine, (a, b), axis=1)
    return hs[:, -1], jnp.einsum("bten,btn->bte", hs, C)


@jax.custom_vjp
def _sequential_chunk(h, inputs, A):
    """Same contract as `_associative_chunk`, one token at a time (T steps of O(E N) work each).

    Only the recurrence itself runs token by token, as one multiply-add per state entry: the decays,
    inputs, outputs and, in the hand-written backward pass, every reduction (dB, dC, d dt, du, dA) are
    batched over the whole chunk outside the loop. Autodiff of a per-token step put small
    reductions inside the loop, where XLA:CPU's per-call cost made the backward ~3x slower at batch 1
    than the same tokens at batch 16. Inside, the chunk's state tensors are (T, b, N, E): E, the long
    axis, is minor, so sums over N add whole rows and sums over E run along contiguous rows. With N
    minor (and einsums, which XLA:CPU transposed into dot layouts first) the layer's fwd+bwd took 0.85
    s instead of 0.72 s at 8 x 512 tokens, E 1024, N 16; 3.2 s instead of 2.9 s at 1 x 16K."""
    return _sequential_chunk_fwd(h, inputs, A)[0]


def _time_major(*arrays):
    """(b, T, ...) -> (T, b, ...) each."""
    return tuple(jnp.moveaxis(x, 1, 0) for x in arrays)


def _rows(x: jax.Array) -> jax.Array:
    """(T, b, ...) unchanged, but (T, 1, ...) -> (T, ...): XLA:CPU reduced a (T, 1, N, E) array over N
    20x slower than the same (T, N, E) one, while merging T and b for b > 1 slowed the layer by 8 %."""
    return x.reshape(x.shape[0], *x.shape[2:]) if x.shape[1] == 1 else x


def _sequential_chunk_fwd(h0, inputs, A):
    u, dt, B, C = _time_major(*inputs)  # (T, b, E) twice, (T, b, N) twice
    a = jnp.exp(dt[:, :, None, :] * A.T)  # (T, b, N, E) decays, kept for the backward pass
    x = B[..., None] * (dt * u)[:, :, None, :]  # (T, b, N, E) inputs

    def step(h, ax):
        h = ax[0] * h + ax[1]
        return h, h

    h, hs = jax.lax.scan(step, jnp.swapaxes(h0, 1, 2), (a, x))  # hs: states after each token
    y = jnp.sum(_rows(hs) * _rows(C)[..., None], axis=-2).reshape(u.shape)  # (T, b, E)
    return (jnp.swapaxes(h, 1, 2), jnp.moveaxis(y, 0, 1)), (h0, inputs, A, hs, a)


def _sequential_chunk_bwd(residuals, cotangents):
    """With h_t = a_t h_{t-1} + (dt_t u_t) B_t, a_t = exp(dt_t A), y_t = h_t C_t: g_t = dL/dh_t =
    a_{t+1} g_{t+1} + dy_t C_t (+ dL/dh_T at the end), then per token dC_t = sum_e h_t dy_t,
    dB_t = sum_e g_t dt_t u_t, d(dt u)_t = sum_n g_t B_t, and through a_t: d dt_t += sum_n g_t h_{t-1}
    a_t A, dA = sum g_t h_{t-1} a_t dt_t. State tensors are (T, b, N, E) as in the forward pass."""
    h0, inputs, A, hs, a = residuals
    u, dt, B, C = _time_major(*inputs)
    dh_end, dy = cotangents
    dy = jnp.moveaxis(dy, 1, 0)  # (T, b, E)
    from_y = C[..., None] * dy[:, :, None, :]  # dL/dh_t through y_t

    def back(g_next, x):  # g_next = a_{t+1} g_{t+1}: what flows into h_t from later tokens
        g = g_next + x[1]
        return x[0] * g, g

    dh0, g = jax.lax.scan(back, jnp.swapaxes(dh_end, 1, 2), (a, from_y), reverse=True)
    h_prev = jnp.concatenate([jnp.swapaxes(h0, 1, 2)[None], hs[:-1]])
    g_decay = g * h_prev * a  # dL/d(dt_t A) per state entry
    hs, g, g_decay, u, dt, B, dy = (_rows(x) for x in (hs, g, g_decay, u, dt, B, dy))
    dC = jnp.sum(hs * dy[..., None, :], axis=-1)  # (..., N)
    dB = jnp.sum(g * (dt * u)[..., None, :], axis=-1)
    d_dtu = jnp.sum(g * B[..., None], axis=-2)  # (..., E)
    d_dt = d_dtu * u + jnp.sum(g_decay * A.T, axis=-2)
    dA = jnp.sum(g_decay * dt[..., None, :], axis=tuple(range(dt.ndim - 1))).T  # (E, N)
    T = a.shape[0]
    batch_major = (jnp.moveaxis(x.reshape(T, -1, x.shape[-1]), 0, 1) for x in (d_dtu * dt, d_dt, dB, dC))
    return jnp.swapaxes(dh0, 1, 2), tuple(batch_major), dA


_sequential_chunk.defvjp(_sequential_chunk_fwd, _sequential_chunk_bwd)


SCANS = {"sequential": _sequential_chunk, "associative": _associative_chunk}
KERNEL = "kernel"  # the whole scan in C++ (cfm_jax/kernels/selective_scan.py), CPU only


def pick_scan(scan: str) -> str:
    """`auto`: on XLA:CPU with one device the C++ kernel where it builds (fwd+bwd 5x faster than the
    sequential chunks at 8 x 512 tokens, E 1024, N 16), else the sequential chunks (~3x faster than
    the associative scan at d_inner 128-1024); associative on accelerators, where a token-by-token
    loop is launch-bound. `kernel` asked for where it cannot run is a one-line error."""
    if scan == "auto":
        if not policy.on_cpu():
            return "associative"
        return KERNEL if policy.cpu_kernels() and scan_kernel.available() is None else "sequential"
    if scan == KERNEL and (why := scan_kernel.available()):
        raise UserError(f"model.mixer.scan=kernel cannot run: {why} (use auto)")
    if scan not in (*SCANS, KERNEL):
        raise ValueError(f"scan={scan!r} is not one of {['auto', *SCANS, KERNEL]}")
    return scan


# Per-chunk state tensors (T x b x E x N) are kept to at most this many elements (4 MB in fp32): the chunk
# length shrinks to fit the batch. Measured on XLA:CPU (layer fwd+bwd, d_model 512, E 1024, N 16,
# sequential kernel): 8 x 512 tokens 0.72 s at 8 tokens per chunk (4: 0.87-0.90 s, 16: 0.79-0.88 s);
# 16 x 1K 2.9-3.0 s at 4 (2: 3.3 s, 8: 3.2-3.5 s); 1 x 16K 2.8-3.0 s at 64 (32: 2.9 s, 128: 3.1 s).
MAX_CHUNK_ELEMENTS = 2**20


def chunk_length(chunk: int, batch: int, state_size: int) -> int:
    """Tokens per chunk: `chunk`, shortened so batch x chunk x state_size <= MAX_CHUNK_ELEMENTS."""
    return max(1, min(chunk, MAX_CHUNK_ELEMENTS // (batch * state_size)))


def selective_scan(u, dt, A, B, C, h0=None, *, chunk: int = 64, scan: str = "auto"):
    """`selective_scan_reference`'s contract, by the kernel `pick_scan(scan)` names: the C++ kernel
    over the whole sequence, or `selective_scan_chunked`."""
    if pick_scan(scan) == KERNEL:
        u, dt, B, C, h0 = _prepare(u, dt, B, C, h0, A)
        return scan_kernel.selective_scan_kernel(u, dt, A.astype(jnp.float32), B, C, h0)
    return selective_scan_chunked(u, dt, A, B, C, h0, chunk=chunk, scan=scan)


def selective_scan_chunked(u, dt, A, B, C, h0=None, *, chunk: int = 64, scan: str = "auto"):
    """Chunked form of `selective_scan_reference` (same arguments and results): (b, T, E, N) exists
    for one chunk at a time, T = `chunk_length` (at most `chunk`). Padded steps have dt = 0, so
    exp(0 A) = 1 and no input: h is unchanged. `scan` picks the within-chunk kernel (SCANS, or auto:
    `pick_scan`)."""
    u, dt, B, C, h0 = _prepare(u, dt, B, C, h0, A)
    length = u.shape[1]
    T = min(chunk_length(chunk, u.shape[0], A.size), length)
    kind = pick_scan(scan)
    kernel = SCANS["sequential" if kind == KERNEL else kind]  # on CPU the chunked form's best
    body = jax.checkpoint(lambda h, inputs: kernel(h, inputs, A))
    h, y = jax.lax.scan(body, h0, tuple(to_chunks(a, length, T) for a in (u, dt, B, C)))
    return from_chunks(y, length), h


# --- the module ---


@partial(jax.jit, static_argnums=(1, 2, 3, 4))  # one compile instead of one per eager op
def _dt_bias(rng: jax.Array, size: int, dt_min: float, dt_max: float, floor: float) -> jax.Array:
    """Inverse softplus of dt ~ log-uniform[dt_min, dt_max] (clamped at floor), as in Mamba."""
    lo, hi = math.log(dt_min), math.log(dt_max)
    dt = jnp.maximum(jnp.exp(jax.random.uniform(rng, (size,)) * (hi - lo) + lo), floor)
    return dt + jnp.log(-jnp.expm1(-dt))


@register("mixer", "mamba", MambaConfig)
class Mamba(nnx.Module):
    def __init__(self, cfg: MambaConfig, ctx: LayerContext, *, rngs: nnx.Rngs):
        d, E, N, R, K = ctx.d_model, cfg.inner(ctx.d_model), cfg.d_state, cfg.rank(ctx.d_model), cfg.d_conv
        self.cfg, self.d_model, self.d_inner = cfg, d, E
        self.in_proj = linear(d, 2 * E, normal_init(ctx.init_std), rngs)
        # PyTorch Conv1d / Linear default scales (uniform, 1/sqrt(fan_in)), which Mamba keeps.
        conv_bound = 1 / math.sqrt(K)
        self.conv_w = nnx.Param(jax.random.uniform(rngs.params(), (K, E), minval=-conv_bound, maxval=conv_bound))
        self.conv_b = nnx.Param(jax.random.uniform(rngs.params(), (E,), minval=-conv_bound, maxval=conv_bound))
        self.x_proj = linear(E, R + 2 * N, nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform"), rngs)
        dt_bound = R**-0.5  # Mamba's dt_init="random": uniform(-dt_rank^-0.5, dt_rank^-0.5)
        self.dt_proj = Linear(
            R, E, rngs=rngs,
            kernel_init=lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -dt_bound, dt_bound),
            bias_init=lambda key, shape, dtype=jnp.float32: _dt_bias(
                key, shape[0], cfg.dt_min, cfg.dt_max, cfg.dt_init_floor).astype(dtype),
        )
        # A_log is stored flat: 1-D parameters escape the trainer's weight decay, as Mamba excludes A_log.
        self.A_log = nnx.Param(jnp.asarray(np.log(np.tile(np.arange(1, N + 1, dtype=np.float32), E))))
        self.D = nnx.Param(jnp.asarray(np.ones((E,), np.float32)))
        self.out_proj = linear(E, d, output_init(ctx), rngs)

    def A(self) -> jax.Array:
        """(d_inner, d_state) negative real diagonal."""
        return -jnp.exp(self.A_log[...].reshape(self.d_inner, self.cfg.d_state))

    def _ssm_inputs(self, xc: jax.Array):
        """xc: (..., E) conv output -> dt (..., E) > 0, B, C (..., N)."""
        R, N = self.dt_proj.in_features, self.cfg.d_state
        dbc = self.x_proj(xc)
        dt = jax.nn.softplus(self.dt_proj(dbc[..., :R]).astype(jnp.float32))
        return dt, dbc[..., R : R + N], dbc[..., R + N :]

    def _conv(self, x: jax.Array) -> jax.Array:
        """Causal depthwise conv. x: (b, L, E) -> silu(conv) (b * L, E), token rows."""
        K, (b, L, E) = self.cfg.d_conv, x.shape
        xp = jnp.pad(x, ((0, 0), (K - 1, 0), (0, 0)))
        w = self.conv_w[...]
        taps = (xp[:, j : j + L].reshape(b * L, E) * w[j] for j in range(K))
        return jax.nn.silu(sum(taps) + self.conv_b[...])

    def _conv_and_gate(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x: (b, L, d_model) -> (conv output xc, gate z), both (b * L, E) token rows."""
        b, L, d = x.shape
        xi, z = jnp.split(self.in_proj(x.reshape(b * L, d)), 2, axis=-1)
        return self._conv(xi.reshape(b, L, -1)), z

    def __call__(self, x: jax.Array):
        """x: (batch, seq, d_model) -> (y: (batch, seq, d_model), aux with the memory horizon).

        Per-token work runs on (batch * seq, .) rows, only the conv and the scan see (batch, seq, .):
        XLA:CPU's gradient reductions over a (1, seq, .) array were ~3x slower than over (seq, .) (the
        layer's non-scan work at 1 x 16K: 2.5 s vs 0.9 s at 16 x 1K)."""
        b, L, d = x.shape
        xc, z = self._conv_and_gate(x)
        dt, B, C = self._ssm_inputs(xc)
        u, dt_seq, B, C = (a.reshape(b, L, -1) for a in (xc, dt, B, C))
        y, _ = selective_scan(u, dt_seq, self.A(), B, C, chunk=self.cfg.chunk_size, scan=self.cfg.scan)
        y = (y.reshape(b * L, -1) + xc * self.D[...]) * jax.nn.silu(z)
        mean_log_decay = jnp.mean(dt, axis=0)[:, None] * self.A()
        out = self.out_proj(y.astype(x.dtype)).reshape(b, L, d)
        return out, make_aux(memory_horizon=horizon(mean_log_decay))

    # --- decoding ---

    def init_state(self, batch: int, max_len: int) -> dict:
        """conv: the last d_conv - 1 conv inputs (batch, d_conv - 1, E); h: (batch, E, N). max_len unused."""
        E = self.d_inner
        return {"conv": jnp.zeros((batch, self.cfg.d_conv - 1, E)), "h": jnp.zeros((batch, E, self.cfg.d_state))}

    def step(self, x: jax.Array, state: dict):
        """One token. x: (batch, d_model) -> (y: (batch, d_model), new state)."""
        xi, z = jnp.split(self.in_proj(x), 2, axis=-1)
        window = jnp.concatenate([state["conv"], xi[:, None].astype(state["conv"].dtype)], axis=1)  # (b, K, E)
        xc = jax.nn.silu(jnp.einsum("bke,ke->be", window, self.conv_w[...]) + self.conv_b[...])
        dt, B, C = self._ssm_inputs(xc)
        y, h = selective_step(state["h"], xc, dt, self.A(), B, C)
        y = (y + xc * self.D[...]) * jax.nn.silu(z)
        return self.out_proj(y.astype(x.dtype)), {"conv": window[:, 1:], "h": h}

    # --- accounting ---

    def state_bytes(self, context_len: int) -> int:
        """Per sequence (fp32), independent of context_len: h (E x N) + conv inputs (E x (d_conv - 1))."""
        return self.d_inner * (self.cfg.d_state + self.cfg.d_conv - 1) * FP32_BYTES

    def flops_per_token(self, context_len: int) -> int:
        """Forward FLOPs per token (2 per multiply-add) of the recurrent form; independent of context_len.
        Projections, conv, and 7 E N for the scan: discretize (dt A, exp), update (a h + dt u B), read C . h."""
        d, E, N, R, K = self.d_model, self.d_inner, self.cfg.d_state, self.dt_proj.in_features, self.cfg.d_conv
        projections = 2 * d * 2 * E + 2 * E * (R + 2 * N) + 2 * R * E + 2 * E * d
        return projections + 2 * E * K + 7 * E * N + 4 * E  # + D skip and gate

    def decay_stats(self, x: jax.Array | None = None) -> jax.Array:
        """Mean log-decay per token of each state entry, (E * N,) <= 0: dt_t A averaged over the tokens
        of x (the mixer input, (batch, seq, d_model)); x = None uses softplus(dt bias), the input-independent
        part of dt."""
        if x is None:
            dt = jax.nn.softplus(self.dt_proj.bias[...])
        else:
            dt = jnp.mean(self._ssm_inputs(self._conv_and_gate(x)[0])[0], axis=0)
        return (dt[:, None] * self.A()).reshape(-1)

    def memory_horizon(self, threshold: float = 0.01, x: jax.Array | None = None) -> float:
        """Tokens after which the mean retained fraction of the state, mean_i exp(distance * l_i) over
        `decay_stats(x)`, falls below `threshold` (see `gated_linear_attention.horizon`)."""
        check_threshold(threshold)
        return float(np.asarray(horizon(self.decay_stats(x), threshold)))
