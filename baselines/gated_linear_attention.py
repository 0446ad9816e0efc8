"""Shared pieces of the gated recurrent mixers (`gla`, `rwkv`, `mamba`): time chunking, the gated
linear-attention kernel, and the memory horizon read off the decays.

Gated linear attention, per head, with a state S (K x V) and a log-decay la_t <= 0 per key dim
(per-dim gate, shape K) or per head (scalar gate, shape 1):

    GLA      S_t = diag(exp(la_t)) S_{t-1} + k_t v_t^T        o_t = q_t . S_t
    RWKV-6   S_t = same                                          o_t = q_t . S_{t-1} + (q_t * u * k_t) v_t

`gla_reference` is the plain scan over time (`gla_step` is also the decoding step);
`gla_chunked` is the training form: an outer lax.scan over chunks of T tokens carrying S (several
chunks side by side per step when the batch is small: their state-independent work batched, the state
threaded through them by a cheap inner scan), and inside a chunk the intra-chunk scores split into
sub-chunks of c tokens (fla's secondary chunking): pairwise decays in the diagonal c x c blocks,
rescaled q and k (to the query's sub-chunk start) in the blocks below. Every decay exponent it forms
is the sum of the log-decays over one segment, computed by cumulative sums that start at a
(sub-)chunk boundary or by a masked segment sum, never as b_t - b_s of two long cumulative sums and
never as exp(-b_s): each exponent is <= 0 (nothing overflows however strong the decay) and keeps the
relative precision of its own size.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp

from cfm_jax import policy
from cfm_jax.errors import UserError

HORIZON_MAX = 1e12  # memory_horizon's cap: a state that keeps > threshold beyond this never forgets


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def to_chunks(x: jax.Array, length: int, chunk: int) -> jax.Array:
    """(batch, length, ...) -> (n_chunks, batch, chunk, ...), zero-padding the time axis at the end."""
    padded = round_up(length, chunk)
    x = jnp.pad(x, [(0, 0), (0, padded - length)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape(x.shape[0], padded // chunk, chunk, *x.shape[2:])
    return jnp.moveaxis(x, 1, 0)


def from_chunks(x: jax.Array, length: int) -> jax.Array:
    """(n_chunks, batch, chunk, ...) -> (batch, length, ...), dropping the padding."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :length]


# --- gated linear attention: one step (decoding and the reference) ---


def gla_step(S: jax.Array, q: jax.Array, k: jax.Array, v: jax.Array, la: jax.Array, bonus: jax.Array | None = None):
    """One token. S: (B, H, K, V) fp32; q, k: (B, H, K); v: (B, H, V); la: (B, H, K or 1) <= 0;
    bonus: None (GLA) or u (H, K) (RWKV-6). Returns (o: (B, H, V), new S)."""
    kv = k[..., :, None] * v[..., None, :]
    decayed = jnp.exp(la)[..., :, None] * S
    if bonus is None:
        S = decayed + kv
        return jnp.einsum("bhk,bhkv->bhv", q, S), S
    o = jnp.einsum("bhk,bhkv->bhv", q, S + bonus[..., None] * kv)
    return o, decayed + kv


def _prepare(q, k, v, la, s0):
    """Cast to fp32 (states and decays never run in bf16) and default the initial state to zeros."""
    q, k, v, la = (a.astype(jnp.float32) for a in (q, k, v, la))
    if s0 is None:
        s0 = jnp.zeros((q.shape[0], q.shape[2], q.shape[3], v.shape[3]), jnp.float32)
    return q, k, v, la, s0.astype(jnp.float32)


def gla_reference(q, k, v, la, s0=None, bonus=None):
    """Plain lax.scan over time. q, k: (B, L, H, K); v: (B, L, H, V); la: (B, L, H, K or 1);
    s0: (B, H, K, V) or None. Returns (o: (B, L, H, V) fp32, final S: (B, H, K, V) fp32)."""
    q, k, v, la, s0 = _prepare(q, k, v, la, s0)

    def step(S, inputs):
        o, S = gla_step(S, *inputs, bonus=bonus)
        return S, o

    S, o = jax.lax.scan(step, s0, tuple(jnp.moveaxis(a, 1, 0) for a in (q, k, v, la)))
    return jnp.moveaxis(o, 0, 1), S


# --- gated linear attention: chunked training form ---


def _masked_exp(x: jax.Array, mask: jax.Array) -> jax.Array:
    """exp(x) where mask, else 0; masking the argument first keeps exp(large) (and its inf * 0 = NaN
    gradient) out of the graph."""
    return jnp.exp(jnp.where(mask, x, -jnp.inf))


def _shift(x: jax.Array, axis: int, reverse: bool = False) -> jax.Array:
    """Shift by one along `axis` (towards the end, or the start if reverse), filling with 0."""
    x = jnp.moveaxis(x, axis, 0)
    zero = jnp.zeros_like(x[:1])
    x = jnp.concatenate([x[1:], zero] if reverse else [zero, x[:-1]])
    return jnp.moveaxis(x, 0, axis)


def _segsum(x: jax.Array, exclusive: bool) -> jax.Array:
    """x: (..., n, G) -> (..., n_t, n_s, G) with [t, s] = sum of x_r over s < r <= t (r < t if
    exclusive), for s < t (other entries are to be masked). Summing only the terms in the segment
    (ssd_minimal's masked cumsum) keeps full relative precision; b_t - b_s of a long cumsum does not."""
    r = jnp.arange(x.shape[-2])
    terms = jnp.where((r[:, None] > r[None, :])[:, :, None], x[..., :, None, :], 0.0)
    seg = jnp.cumsum(terms, axis=-3)
    return _shift(seg, axis=-3) if exclusive else seg


def _gla_chunk_parts(inputs, *, sub: int, bonus):
    """The parts of one chunk of T = n * sub tokens that do not depend on the state carried in.
    Inputs q, k: (B, H, T, K), v: (B, H, T, V), la: (B, H, T, G). Returns
    (o_local: (B, H, T, V) the output from this chunk's own tokens, q_in: (B, H, T, K) the queries
    decayed to read the incoming state, decay: (B, H, G) the whole chunk's decay, U: (B, H, K, V) what
    the chunk adds to the state), so that with incoming state S:
        o = o_local + q_in . S        S_end = decay * S + U.

    Every decay exponent is a sum of log-decays over one segment, built from cumulative sums that start
    at a (sub-)chunk boundary, so it is <= 0 and has the relative precision of its own magnitude."""
    q, k, v, la = inputs
    B, H, T, K = q.shape
    n, strict = T // sub, bonus is not None  # RWKV reads S_{t-1}: decays up to t-1, keys s < t
    qs, ks, vs, las = (a.reshape(B, H, n, sub, a.shape[-1]) for a in (q, k, v, la))
    cum = jnp.cumsum(las, axis=3)  # sub-chunk start -> t (inclusive)
    cum_q = _shift(cum, axis=3) if strict else cum  # what query t sees: start -> t (or t - 1)
    suffix = _shift(jnp.cumsum(las[:, :, :, ::-1], axis=3)[:, :, :, ::-1], axis=3, reverse=True)  # s+1 -> end
    totals = cum[:, :, :, -1]  # (B, H, n, G): whole sub-chunk
    before = jnp.cumsum(_shift(totals, axis=2), axis=2)  # chunk start -> sub-chunk start
    after = _shift(jnp.cumsum(totals[:, :, ::-1], axis=2)[:, :, ::-1], axis=2, reverse=True)  # sub-chunk end -> chunk end

    # 1. What reads the state carried in from earlier chunks.
    q_in = (qs * jnp.exp(before[:, :, :, None] + cum_q)).reshape(B, H, T, K)
    # 2. Diagonal c x c blocks: pairwise decays.
    t = jnp.arange(sub)
    diag_mask = (t[None, :] < t[:, None]) if strict else (t[None, :] <= t[:, None])  # (c_q, c_k)
    decay = _masked_exp(_segsum(las, exclusive=strict), diag_mask[:, :, None])  # (B, H, n, c, c, G)
    if la.shape[-1] == 1:
        scores = jnp.einsum("bhnck,bhnsk->bhncs", qs, ks) * decay[..., 0]
    else:
        scores = jnp.einsum("bhnck,bhnsk,bhncsk->bhncs", qs, ks, decay)
    o = jnp.einsum("bhncs,bhnsv->bhncv", scores, vs)
    # 3. Off-diagonal blocks (query sub-chunk i > key sub-chunk j): q decays from its sub-chunk start,
    # k from s + 1 through the sub-chunks between j and i.
    if n > 1:
        below = jnp.arange(n)[None, :] < jnp.arange(n)[:, None]  # (n_i, n_j): j < i
        between = _segsum(totals, exclusive=True)  # (B, H, n_i, n_j, G)
        k_decay = _masked_exp(suffix[:, :, None] + between[:, :, :, :, None], below[:, :, None, None])
        scores = jnp.einsum("bhick,bhijsk->bhijcs", qs * jnp.exp(cum_q), ks[:, :, None] * k_decay)
        o = o + jnp.einsum("bhijcs,bhjsv->bhicv", scores, vs)
    if bonus is not None:
        o = o + jnp.sum(qs * bonus[:, None, None, :] * ks, axis=-1, keepdims=True) * vs
    # 4. What the chunk adds to the state by its end.
    k_to_end = ks * jnp.exp(suffix + after[:, :, :, None])
    U = jnp.einsum("bhnck,bhncv->bhkv", k_to_end, vs)
    return o.reshape(B, H, T, -1), q_in, jnp.exp(jnp.sum(totals, axis=2)), U


def _gla_chunks(S, inputs, *, sub: int, bonus):
    """m chunks side by side. S: (B, H, K, V); inputs q, k: (m, B, H, T, K), v: (m, B, H, T, V),
    la: (m, B, H, T, G). Returns (S after the last chunk, o: (m, B, H, T, V)).

    The state-independent parts of all m chunks are computed at once (batched over m x B), then a
    cheap scan over m threads the state through them: at batch 1 the intra-chunk work is as parallel
    as at batch m, and the sequential part is one (B, H, K, V) multiply-add per chunk."""
    m, B = inputs[0].shape[:2]
    flat = tuple(a.reshape(m * B, *a.shape[2:]) for a in inputs)
    o_local, q_in, decay, U = (a.reshape(m, B, *a.shape[1:]) for a in _gla_chunk_parts(flat, sub=sub, bonus=bonus))

    def carry(S, chunk):
        decay, U = chunk
        return decay[..., None] * S + U, S  # (state after the chunk, state the chunk read)

    S, S_in = jax.lax.scan(carry, S, (decay, U))
    return S, o_local + jnp.einsum("mbhtk,mbhkv->mbhtv", q_in, S_in)


def _sequential_chunk(S, inputs, *, bonus):
    """One chunk token by token (`gla_step`). S: (B, H, K, V); inputs q, k: (B, H, T, K), v: (B, H, T, V),
    la: (B, H, T, G). Returns (S at the chunk end, o: (B, H, T, V))."""

    def step(S, x):
        o, S = gla_step(S, *x, bonus=bonus)
        return S, o

    S, o = jax.lax.scan(step, S, tuple(jnp.moveaxis(a, 2, 0) for a in inputs))
    return S, jnp.moveaxis(o, 0, 2)


SCANS = ("auto", "matmul", "sequential")
SEQUENTIAL_MAX_STATE = 512  # `auto` scans token by token when a head's state has at most this many entries


def pick_scan(scan: str, d_k: int, d_v: int, backend: str | None = None) -> str:
    """Resolve a mixer's `scan` setting. On XLA:CPU the matmul (chunkwise-parallel) form is ~2x faster
    than a token-by-token scan for 64 x 64 head states, and ~4x slower for 16 x 16 ones, whose
    intra-chunk matmuls are too small to pay for themselves (measured fwd+bwd, 32-1024 tokens). On
    accelerators `auto` is always matmul: a token-by-token loop there is launch-bound."""
    if scan not in SCANS:
        raise ValueError(f"scan={scan!r} is not one of {SCANS}")
    if scan == "auto":
        small = d_k * d_v <= SEQUENTIAL_MAX_STATE
        return "sequential" if policy.token_loop_pays(small, backend) else "matmul"
    return scan


def check_scan(scan: str) -> None:
    if scan not in SCANS:
        raise UserError(f"model.mixer.scan={scan!r} is not one of {list(SCANS)}")


# pick_chunks_per_step "auto": chunks side by side per scan step x batch >= this. Measured on XLA:CPU
# (GLA and RWKV-6 layers, d_model 512, fwd+bwd at 16 x 1K, 4 x 4K, 1 x 16K tokens): 4 made 1 x 16K as
# fast as 16 x 1K (GLA 1.42 -> 1.16 s, RWKV 3.09 -> 2.66 s); 16 or 32 is slower again (bigger
# intra-chunk temporaries fall out of cache).
PARALLEL_LANES = 4


def pick_chunks_per_step(batch: int, n_chunks: int, requested: int | None = None) -> int:
    """How many chunks a chunked scan processes side by side per step (None: auto). Auto keeps
    batch x chunks >= PARALLEL_LANES, so a batch-1 long sequence runs its intra-chunk work as wide as
    a batch-4 one; 1 for batches of 4 or more (the plain one-chunk-per-step scan)."""
    m = max(1, PARALLEL_LANES // batch) if requested is None else requested
    if m < 1:
        raise ValueError(f"chunks_per_step={m} must be >= 1")
    return min(m, n_chunks)


def group_chunks(xs: tuple, m: int) -> tuple:
    """(n, ...) arrays -> (ceil(n / m), m, ...), zero-padding whole chunks at the end. A zero chunk has
    log-decay 0 and k = v = 0, so it leaves the state unchanged."""
    n = xs[0].shape[0]
    pad = round_up(n, m) - n
    return tuple(jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)).reshape(-1, m, *x.shape[1:]) for x in xs)


def gla_chunked(q, k, v, la, s0=None, bonus=None, *, chunk: int = 64, sub_chunk: int = 16, scan: str = "matmul",
                chunks_per_step: int | None = None):
    """Chunked form of `gla_reference` (same arguments and results). `chunk` tokens per chunk,
    `sub_chunk` (dividing chunk) per intra-chunk block; a scalar gate (G = 1) uses one block, since its
    decay matrix is shared by all key dims. The outer lax.scan takes `chunks_per_step` chunks per step
    (None: auto, `pick_chunks_per_step`), their intra-chunk work batched (`_gla_chunks`). `scan="sequential"`
    runs each chunk token by token instead of the intra-chunk matmuls (faster for small head states;
    see `pick_scan`; one chunk per step). Padded steps have la = 0 and k = v = 0, so they leave S
    unchanged. Each step's body is rematerialized in the backward pass, so only (q, k, v, la) and one
    state per step are kept, never a (T, T, K) tensor per chunk."""
    if chunk < 1 or sub_chunk < 1 or chunk % sub_chunk:
        raise ValueError(f"sub_chunk={sub_chunk} must be >= 1 and divide chunk={chunk}")
    q, k, v, la, s0 = _prepare(q, k, v, la, s0)
    length = q.shape[1]
    T = min(chunk, round_up(length, sub_chunk))
    sub = T if la.shape[-1] == 1 else sub_chunk
    # (B, L, H, X) -> (n_chunks, B, H, T, X)
    xs = tuple(jnp.swapaxes(to_chunks(a, length, T), 2, 3) for a in (q, k, v, la))
    if pick_scan(scan, q.shape[-1], v.shape[-1]) == "sequential":
        body = jax.checkpoint(lambda S, inputs: _sequential_chunk(S, inputs, bonus=bonus))
        S, o = jax.lax.scan(body, s0, xs)
    else:
        n = xs[0].shape[0]
        groups = group_chunks(xs, pick_chunks_per_step(q.shape[0], n, chunks_per_step))
        body = jax.checkpoint(lambda S, inputs: _gla_chunks(S, inputs, sub=sub, bonus=bonus))
        S, o = jax.lax.scan(body, s0, groups)
        o = o.reshape(-1, *o.shape[2:])[:n]
    return from_chunks(jnp.swapaxes(o, 2, 3), length), S


# --- memory horizon ---


def retained_fraction(mean_log_decay: jax.Array, distance: jax.Array) -> jax.Array:
    """Mean over state channels of exp(distance * l_i): the fraction a typical state entry keeps of
    what it held `distance` tokens ago (geometric-mean decay l_i = mean log-decay per token)."""
    return jnp.mean(jnp.exp(distance * jnp.minimum(mean_log_decay.astype(jnp.float32), 0.0)))


@partial(jax.jit, static_argnames="iterations")
def horizon(mean_log_decay: jax.Array, threshold: float = 0.01, iterations: int = 64) -> jax.Array:
    """Distance (tokens, real-valued) at which `retained_fraction` falls to `threshold`, by bisection
    on log(distance) (the fraction decreases monotonically); HORIZON_MAX if it never does.
    mean_log_decay: (channels,) <= 0. Jittable; returns an fp32 scalar."""
    ell = jax.lax.stop_gradient(mean_log_decay.reshape(-1))
    lo, hi = math.log(1e-6), math.log(HORIZON_MAX)

    def bisect(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        above = retained_fraction(ell, jnp.exp(mid)) >= threshold
        return jnp.where(above, mid, lo), jnp.where(above, hi, mid)

    lo, hi = jax.lax.fori_loop(0, iterations, bisect, (jnp.float32(lo), jnp.float32(hi)))
    never = retained_fraction(ell, jnp.float32(HORIZON_MAX)) >= threshold
    return jnp.where(never, jnp.float32(HORIZON_MAX), jnp.exp(0.5 * (lo + hi)))


def check_threshold(threshold: float) -> None:
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold={threshold} must be in (0, 1)")
