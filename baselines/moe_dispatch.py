"""MoE dispatch: send each token to its chosen experts, run the stacked experts, combine.

Experts are SwiGLU (default), ReGLU (relu(x W_g) * (x W_u)) or plain ReLU (relu(x W_u), no gate:
`gate` is then a zero-width (E, d, 0) array, so every path below runs unchanged); `Experts.act` names
which, as static pytree metadata.

Fast paths, all index gathers into per-expert row buffers followed by matmuls (on XLA:CPU this
beat one-hot einsum dispatch 4-8x and `ragged_dot` 10x+, REFERENCE.md section 2):

- `capacity_dispatch`: buffers (E, G*C, d), C = capacity per expert per token group; assignments
  past C are dropped, top-1 choices of a group before top-2 ones, then by position.
- `dropless_dispatch`: assignments sorted by expert into blocks of b rows, each expert's run padded
  to a multiple of b; `blocked_ffn` loops over each expert's blocks with that expert's weights
  (`blocked_ffn_reference`, which gathers the weights per block, is its obviously-right twin). Nothing
  is dropped and the padding is at most E*(b-1) rows (b is chosen so that is <= 1/4 of the real rows).
- `grouped_dispatch`: what `dropless_dispatch` runs where the model's matmuls run in MKL
  (cfm_jax.kernels.cblas): assignments sorted by expert with no padding, each expert's rows one
  MKL sgemm (`grouped_matmul`, row counts read at run time), and the row gathers' gradients
  gathers too (`take_rows`) rather than scatter-adds. At 4K tokens, d 512, 8 experts, top-2 the
  layer's forward + backward went from 1.8-2.0x a dense FFN of equal active parameters to 1.1-1.35x.

`moe_reference` is the plain per-expert loop (every expert on every token, masked) they are tested
against, outputs and gradients. Shapes: N tokens, d model width, E experts, f expert width,
K selection slots per token, G token groups of T tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp

from cfm_jax import policy
from cfm_jax.kernels.cblas import backend, grouped_matmul, product


ACTIVATIONS = ("swiglu", "reglu", "relu")


@functools.partial(jax.tree_util.register_dataclass, data_fields=["gate", "up", "down"], meta_fields=["act"])
@dataclasses.dataclass(frozen=True)
class Experts:
    gate: jax.Array  # (E, d, f); (E, d, 0) for act="relu"
    up: jax.Array  # (E, d, f)
    down: jax.Array  # (E, f, d)
    act: str = "swiglu"  # one of ACTIVATIONS

    def replace(self, gate, up, down) -> "Experts":
        return Experts(gate, up, down, self.act)


def hidden(g: jax.Array, u: jax.Array, act: str) -> jax.Array:
    """The expert's activations from its pre-activations g = x W_g (width 0 for relu), u = x W_u."""
    if act == "swiglu":
        return jax.nn.silu(g) * u
    if act == "reglu":
        return jax.nn.relu(g) * u
    return jax.nn.relu(u)


def hidden_vjp(g: jax.Array, u: jax.Array, dh: jax.Array, act: str) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(dg, du, h) for h = hidden(g, u, act) and its cotangent dh (hand-written for the blocked loops)."""
    if act == "swiglu":
        sig = jax.nn.sigmoid(g)
        s = g * sig
        return dh * u * sig * (1 + g * (1 - sig)), dh * s, s * u
    if act == "reglu":
        s = jax.nn.relu(g)
        return jnp.where(g > 0, dh * u, 0), dh * s, s * u
    return g, jnp.where(u > 0, dh, 0), jax.nn.relu(u)  # g is (..., 0): its cotangent is empty too


def expert_ffn(xb: jax.Array, w: Experts) -> jax.Array:
    """Batched experts: xb (E, M, d) rows of expert e -> (E, M, d)."""
    h = hidden(jnp.einsum("emd,edf->emf", xb, w.gate), jnp.einsum("emd,edf->emf", xb, w.up), w.act)
    return jnp.einsum("emf,efd->emd", h, w.down)


def group_shape(batch: int, seq: int, group_size: int) -> tuple[int, int]:
    """(G, T): one group per sequence (group_size 0) or fixed groups of the flattened tokens (the
    last one padded)."""
    if group_size == 0:
        return batch, seq
    return -(-batch * seq // group_size), group_size


def capacity(tokens_per_group: int, slots: int, n_experts: int, factor: float) -> int:
    """C = ceil(T * K / E * factor), at most T (a token uses an expert once, so T never drops)."""
    return max(1, min(tokens_per_group, math.ceil(tokens_per_group * slots * factor / n_experts - 1e-9)))


def _rank_in_segment(segment: jax.Array, n_segments: int) -> jax.Array:
    """segment: (A,) int in [0, n_segments] -> (A,) position of each element among the earlier
    elements of its segment (stable: order of appearance)."""
    order = jnp.argsort(segment, stable=True)
    counts = jnp.bincount(segment, length=n_segments + 1)
    starts = jnp.cumsum(counts) - counts
    seg_sorted = segment[order]
    rank_sorted = jnp.arange(segment.shape[0]) - starts[seg_sorted]
    return jnp.zeros_like(segment).at[order].set(rank_sorted)


def _gather_rows(x: jax.Array, src: jax.Array) -> jax.Array:
    """x: (N, d); src: (M,) in [0, N], N meaning an empty (zero) row -> (M, d). An out-of-range fill
    rather than a zero row appended to x: no copy of x (4 % of the MoE layer's fwd+bwd at 4K tokens)."""
    return jnp.take(x, src, axis=0, mode="fill", fill_value=0)


def _combine(yb: jax.Array, dest: jax.Array, weights: jax.Array) -> jax.Array:
    """yb: (M, d) expert outputs; dest: (A,) row of each assignment, M = dropped; weights (A,) ->
    (A, d) weighted outputs per assignment."""
    return _gather_rows(yb, dest) * weights[:, None].astype(yb.dtype)


def capacity_dispatch(
    x: jax.Array,
    experts: jax.Array,
    weights: jax.Array,
    valid: jax.Array,
    w: Experts,
    *,
    groups: tuple[int, int],
    cap: int,
    n_experts: int | None = None,
    expert_fn: Callable[[jax.Array], jax.Array] | None = None,
) -> tuple[jax.Array, jax.Array]:
    """x: (N, d); experts, weights, valid: (N, K); groups = (G, T) with G*T >= N (padding is never
    routed); cap = C. Returns (y: (N, d), kept: (N, K) bool).

    expert_fn maps the buffers (E, G*C, d) to outputs of the same shape (default: `expert_ffn` with
    w); expert parallelism swaps in one that exchanges the buffers between devices (and passes
    n_experts = E, since its w holds only the local experts).
    """
    n, d = x.shape
    k = experts.shape[1]
    n_experts = n_experts or w.gate.shape[0]
    g, t = groups
    pad = g * t - n
    # Slot-major order inside each group: every token's top-1 choice before any top-2 choice.
    e = jnp.pad(experts, ((0, pad), (0, 0))).reshape(g, t, k).transpose(0, 2, 1).reshape(-1)
    ok = jnp.pad(valid, ((0, pad), (0, 0))).reshape(g, t, k).transpose(0, 2, 1).reshape(-1)
    group = jnp.repeat(jnp.arange(g), k * t)
    token = (jnp.arange(g)[:, None, None] * t + jnp.arange(t)[None, None, :]).repeat(k, 1).reshape(-1)
    segment = jnp.where(ok, group * n_experts + e, g * n_experts)
    pos = _rank_in_segment(segment, g * n_experts)
    keep = ok & (pos < cap)
    rows = n_experts * g * cap
    dest = jnp.where(keep, e * (g * cap) + group * cap + pos, rows)  # buffer row, `rows` = dropped
    src = jnp.full((rows + 1,), n, jnp.int32).at[dest].set(jnp.minimum(token, n).astype(jnp.int32))[:rows]
    xb = _gather_rows(x, src).reshape(n_experts, g * cap, d)
    yb = (expert_fn or (lambda b: expert_ffn(b, w)))(xb).reshape(rows, d)
    w_flat = jnp.pad(weights, ((0, pad), (0, 0))).reshape(g, t, k).transpose(0, 2, 1).reshape(-1)
    y = _combine(yb, dest, w_flat).reshape(g, k, t, d).sum(axis=1).reshape(g * t, d)[:n]
    kept = keep.reshape(g, k, t).transpose(0, 2, 1).reshape(g * t, k)[:n]
    return y, kept


def block_size(assignments: int, n_experts: int) -> int:
    """Largest power of two <= assignments / (4 E), in [1, 128]: padding <= E*(b-1) stays under a
    quarter of the real rows while blocks are long enough for efficient matmuls."""
    return 1 << max(0, min(7, int(math.log2(max(1.0, assignments / (4 * n_experts))))))


def blocked_ffn_reference(xb: jax.Array, block_expert: jax.Array, w: Experts) -> jax.Array:
    """Every block times its expert's gathered weights. xb: (n_blocks, b, d); block_expert:
    (n_blocks,) -> (n_blocks, b, d). Obviously right, but it copies a (d, f) weight triple per block
    (and scatter-adds one per block in the backward pass)."""
    h = hidden(jnp.einsum("nbd,ndf->nbf", xb, w.gate[block_expert]),
               jnp.einsum("nbd,ndf->nbf", xb, w.up[block_expert]), w.act)
    return jnp.einsum("nbf,nfd->nbd", h, w.down[block_expert])


def _blocks_of(first: jax.Array, count: jax.Array, e: jax.Array, body, carry):
    """fori_loop over expert e's blocks first[e] .. first[e] + count[e] - 1: carry = body(block, carry)."""
    return jax.lax.fori_loop(first[e], first[e] + count[e], body, carry)


@jax.custom_vjp
def blocked_ffn(xb: jax.Array, first: jax.Array, count: jax.Array, w: Experts) -> jax.Array:
    """`blocked_ffn_reference` for blocks sorted by expert: expert e owns blocks first[e] ..
    first[e] + count[e] - 1 (blocks owned by no expert come out zero). xb: (n_blocks, b, d);
    first, count: (E,) int -> (n_blocks, b, d).

    An outer loop over experts slices each expert's weights once and an inner loop runs its blocks,
    so no weights are copied per block; the backward pass (hand-written, the loops have data-dependent
    trip counts) accumulates each expert's weight gradients in place the same way, with the forward
    pass's pre-activations kept as residuals: 9 block matmuls in all (6 for relu), a dense FFN's count."""
    return _blocked_ffn_fwd(xb, first, count, w)[0]


def _expert_weights(w: Experts, e: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Expert e's (W_gate | W_up): (d, 2f), one matmul per block for both, and W_down: (f, d)."""
    return jnp.concatenate([w.gate[e], w.up[e]], axis=1), w.down[e]


def _blocked_ffn_fwd(xb, first, count, w):
    n_blocks, b, _ = xb.shape
    fg, f = w.gate.shape[2], w.up.shape[2]
    dtype = jnp.result_type(xb, w.up)

    def expert(e, carry):
        w_in, wd = _expert_weights(w, e)

        def block(i, carry):
            y, g, u = carry
            gu = product(xb[i], w_in)
            gi, ui = gu[:, :fg], gu[:, fg:]
            return y.at[i].set(product(hidden(gi, ui, w.act), wd)), g.at[i].set(gi), u.at[i].set(ui)

        return _blocks_of(first, count, e, block, carry)

    carry = (jnp.zeros(xb.shape, dtype), jnp.zeros((n_blocks, b, fg), dtype), jnp.zeros((n_blocks, b, f), dtype))
    y, g, u = jax.lax.fori_loop(0, w.gate.shape[0], expert, carry)
    return y, (xb, first, count, w, g, u)


def _blocked_ffn_bwd(residuals, dy):
    """Per block, with h = hidden(g, u), y = h W_down: dh = dy W_down^T, (dg, du) from `hidden_vjp`;
    dx = dg W_gate^T + du W_up^T; dW_gate += x^T dg, dW_up += x^T du, dW_down += h^T dy. Weight
    gradients accumulate in float32 (or wider) per expert."""
    xb, first, count, w, g, u = residuals

    def expert(e, carry):
        dxb, dw = carry
        w_in, wd = _expert_weights(w, e)

        def block(i, carry):
            dxb, dw_in, dwd = carry
            x, gi, ui, dyi = xb[i], g[i], u[i], dy[i]
            dgi, dui, h = hidden_vjp(gi, ui, product(dyi, wd, trans_b=True), w.act)
            dgu = jnp.concatenate([dgi, dui], axis=1)  # (b, fg + f)
            return (dxb.at[i].set(product(dgu, w_in, trans_b=True).astype(dxb.dtype)),
                    dw_in + product(x, dgu, trans_a=True), dwd + product(h, dyi, trans_a=True))

        acc_dtype = jnp.promote_types(w_in.dtype, jnp.float32)  # float32 at least
        acc = (jnp.zeros(w_in.shape, acc_dtype), jnp.zeros(wd.shape, acc_dtype))
        dxb, dw_in, dwd = _blocks_of(first, count, e, block, (dxb, *acc))
        fg = w.gate.shape[2]
        parts = (dw_in[:, :fg], dw_in[:, fg:], dwd)
        dw = dw.replace(*(full.at[e].set(part.astype(full.dtype))
                          for full, part in zip((dw.gate, dw.up, dw.down), parts)))
        return dxb, dw

    zeros_w = jax.tree.map(jnp.zeros_like, w)
    dxb, dw = jax.lax.fori_loop(0, w.gate.shape[0], expert, (jnp.zeros_like(xb), zeros_w))
    return dxb, None, None, dw


blocked_ffn.defvjp(_blocked_ffn_fwd, _blocked_ffn_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def take_rows(x: jax.Array, rows: jax.Array, back: jax.Array, fold: int) -> jax.Array:
    """x[rows] for an index that reaches every row of x exactly `fold` times: x (N, d); rows (N*fold,);
    back (N*fold,) such that rows[back[j*fold + s]] = j for s < fold -> (N*fold, d). Its gradient is a
    gather too (each row of x sums its fold copies), not the scatter-add XLA would make of it."""
    return jnp.take(x, rows, axis=0)


def _take_rows_fwd(x, rows, back, fold):
    return jnp.take(x, rows, axis=0), back


def _take_rows_bwd(fold, back, g):
    dx = jnp.take(g, back, axis=0)
    return dx.reshape(-1, fold, g.shape[1]).sum(axis=1), None, None


take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)


def grouped_dispatch(
    x: jax.Array, experts: jax.Array, weights: jax.Array, valid: jax.Array, w: Experts
) -> tuple[jax.Array, jax.Array]:
    """`dropless_dispatch` without padding: assignments sorted by expert, each expert's run of rows
    through `grouped_matmul` (one MKL sgemm per expert, its row count read at run time).
    x: (N, d); experts, weights, valid: (N, K) -> (y: (N, d), kept = valid)."""
    n, d = x.shape
    k = experts.shape[1]
    n_experts, fg = w.gate.shape[0], w.gate.shape[2]
    e = jnp.where(valid, experts, n_experts).reshape(-1)  # (A,); unused slots sort last, past every group
    order = jnp.argsort(e, stable=True).astype(jnp.int32)  # assignment held by each sorted row
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=jnp.int32))
    sizes = jnp.bincount(e, length=n_experts + 1)[:n_experts].astype(jnp.int32)
    xs = take_rows(x, order // k, inverse, k)  # (A, d), assignment a = token * K + slot
    gu = grouped_matmul(xs, jnp.concatenate([w.gate, w.up], axis=2), sizes)  # (A, 2f)
    ys = grouped_matmul(hidden(gu[:, :fg], gu[:, fg:], w.act), w.down, sizes)  # (A, d), unused rows 0
    y = take_rows(ys, inverse, order, 1) * weights.reshape(-1, 1).astype(ys.dtype)
    return y.reshape(n, k, d).sum(axis=1), valid


def ragged_dispatch(
    x: jax.Array, experts: jax.Array, weights: jax.Array, valid: jax.Array, w: Experts
) -> tuple[jax.Array, jax.Array]:
    """`dropless_dispatch` for accelerators: assignments sorted by expert, each expert's rows through
    `jax.lax.ragged_dot` (a grouped GEMM on GPU / TPU; XLA:CPU runs it as masked dense, so the CPU
    uses the paths below). x: (N, d); experts, weights, valid: (N, K) -> (y: (N, d), kept = valid)."""
    n, d = x.shape
    k = experts.shape[1]
    n_experts, fg = w.gate.shape[0], w.gate.shape[2]
    e = jnp.where(valid, experts, n_experts).reshape(-1)  # unused slots sort last, in no group
    order = jnp.argsort(e, stable=True)
    sizes = jnp.bincount(e, length=n_experts + 1)[:n_experts].astype(jnp.int32)
    xs = jnp.take(x, order // k, axis=0)  # (A, d), assignment a = token * K + slot
    gu = jax.lax.ragged_dot(xs, jnp.concatenate([w.gate, w.up], axis=2), sizes)  # rows past sum(sizes): 0
    ys = jax.lax.ragged_dot(hidden(gu[:, :fg], gu[:, fg:], w.act), w.down, sizes)  # (A, d)
    y = jnp.zeros_like(ys).at[order].set(ys) * weights.reshape(-1, 1).astype(ys.dtype)
    return y.reshape(n, k, d).sum(axis=1), valid


def dropless_dispatch(
    x: jax.Array, experts: jax.Array, weights: jax.Array, valid: jax.Array, w: Experts
) -> tuple[jax.Array, jax.Array]:
    """x: (N, d); experts, weights, valid: (N, K) -> (y: (N, d), kept = valid). Off the CPU
    `ragged_dispatch` (a grouped GEMM); on it, with MKL products (cfm_jax.kernels.cblas)
    `grouped_dispatch`, otherwise fixed-size blocks (below), as XLA's `ragged_dot` runs as masked
    dense on CPU."""
    n, d = x.shape
    if not policy.on_cpu():
        return ragged_dispatch(x, experts, weights, valid, w)
    if backend(x, w.up, flops=2 * x.size * w.up.shape[2] * experts.shape[1])[0] == "mkl":
        return grouped_dispatch(x, experts, weights, valid, w)
    k = experts.shape[1]
    n_experts = w.gate.shape[0]
    a = n * k
    b = block_size(a, n_experts)
    n_blocks = -(-(a + n_experts * (b - 1)) // b)  # bound on sum_e ceil(c_e / b)
    rows = n_blocks * b
    e = jnp.where(valid, experts, n_experts).reshape(-1)  # unused slots go to a virtual expert E
    counts = jnp.bincount(e, length=n_experts + 1)[:n_experts]
    padded = -(-counts // b) * b
    ends = jnp.cumsum(padded)
    starts = ends - padded
    rank = _rank_in_segment(e, n_experts)
    dest = jnp.where(e < n_experts, starts[jnp.minimum(e, n_experts - 1)] + rank, rows)
    token = jnp.repeat(jnp.arange(n, dtype=jnp.int32), k)
    src = jnp.full((rows + 1,), n, jnp.int32).at[dest].set(token)[:rows]
    xb = _gather_rows(x, src).reshape(n_blocks, b, d)
    yb = blocked_ffn(xb, (starts // b).astype(jnp.int32), (padded // b).astype(jnp.int32), w).reshape(rows, d)
    y = _combine(yb, dest, weights.reshape(-1)).reshape(n, k, d).sum(axis=1)
    return y, valid


def reference_keep(experts: jax.Array, valid: jax.Array, n_experts: int, groups: tuple[int, int], cap: int | None):
    """(N, K) bool: which assignments survive capacity `cap` (None = dropless), one expert at a time:
    within a group, an expert takes assignments in slot-major order until it holds `cap`."""
    if cap is None:
        return valid
    n, k = experts.shape
    g, t = groups
    pad = g * t - n
    e = jnp.pad(experts, ((0, pad), (0, 0))).reshape(g, t, k).transpose(0, 2, 1).reshape(g, k * t)
    ok = jnp.pad(valid, ((0, pad), (0, 0))).reshape(g, t, k).transpose(0, 2, 1).reshape(g, k * t)
    keep = jnp.zeros_like(ok)
    for j in range(n_experts):
        mine = ok & (e == j)
        keep = keep | (mine & (jnp.cumsum(mine, axis=1) <= cap))
    return keep.reshape(g, k, t).transpose(0, 2, 1).reshape(g * t, k)[:n]


def moe_reference(x: jax.Array, experts: jax.Array, weights: jax.Array, kept: jax.Array, w: Experts) -> jax.Array:
    """Per-expert loop: y = sum_e (sum of the token's kept weights on e) * FFN_e(x), every expert
    run densely on every token. x: (N, d); experts, weights, kept: (N, K) -> (N, d)."""
    y = jnp.zeros_like(x)
    for j in range(w.gate.shape[0]):
        gate = jnp.sum(jnp.where((experts == j) & kept, weights, 0.0), axis=-1)  # (N,)
        h = hidden(x @ w.gate[j], x @ w.up[j], w.act)
        y = y + gate[:, None] * (h @ w.down[j])
    return y
