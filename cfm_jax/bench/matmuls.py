"""The matmuls of a jitted function, listed from its jaxpr and timed one by one, for `cfm-jax bench`.

Used to split a training step's time into "its matmuls, each run alone" and "everything else", in
XLA and (with the same list, through `torch.einsum`) in PyTorch: how much of a step-time gap comes
from the matmul library rather than from the rest of the step.
"""

from __future__ import annotations

import string
from collections import Counter

import jax
import jax.extend.core as jax_core
import numpy as np

# (lhs shape, rhs shape, dtype name, ((lhs contracting, rhs contracting), (lhs batch, rhs batch)))
Matmul = tuple[tuple[int, ...], tuple[int, ...], str, tuple]


def step_matmuls(fn, *args) -> Counter:
    """Every `dot_general` that fn(*args) runs, with how many times: {Matmul: count}. Sub-jaxprs
    (jit, custom_vjp, checkpoint) are walked; a scan's body counts `length` times. A while loop (trip
    count unknown) or a cond (one branch runs) raises NotImplementedError rather than miscount. The key
    keeps the lhs dtype only: mixed-precision dots are re-run in that dtype."""
    found: Counter = Counter()

    def walk(jaxpr, times: int) -> None:
        for eqn in jaxpr.eqns:
            if eqn.primitive.name in ("while", "cond"):
                raise NotImplementedError(f"step_matmuls cannot count matmuls under a {eqn.primitive.name}")
            if eqn.primitive.name == "dot_general":
                lhs, rhs = (v.aval for v in eqn.invars)
                dims = tuple(tuple(tuple(int(i) for i in axes) for axes in pair) for pair in eqn.params["dimension_numbers"])
                found[(tuple(lhs.shape), tuple(rhs.shape), lhs.dtype.name, dims)] += times
            inner = times * eqn.params.get("length", 1) if eqn.primitive.name == "scan" else times
            for value in eqn.params.values():
                for sub in value if isinstance(value, (tuple, list)) else (value,):
                    if isinstance(sub, jax_core.ClosedJaxpr):
                        walk(sub.jaxpr, inner)
                    elif isinstance(sub, jax_core.Jaxpr):
                        walk(sub, inner)

    walk(jax.make_jaxpr(fn)(*args).jaxpr, 1)
    return found


def flops(m: Matmul) -> int:
    """2 per multiply-add: 2 * (output elements) * (contracted size)."""
    lhs, rhs, _, ((lc, rc), (lb, rb)) = m
    batch = np.prod([lhs[i] for i in lb], dtype=np.int64)
    contracted = np.prod([lhs[i] for i in lc], dtype=np.int64)
    lhs_free = np.prod([n for i, n in enumerate(lhs) if i not in lc and i not in lb], dtype=np.int64)
    rhs_free = np.prod([n for i, n in enumerate(rhs) if i not in rc and i not in rb], dtype=np.int64)
    return int(2 * batch * lhs_free * rhs_free * contracted)


def einsum_spec(m: Matmul) -> str:
    """The einsum string of a dot_general (output: batch axes, lhs free axes, rhs free axes, in order),
    so another library can run the same product."""
    lhs, rhs, _, ((lc, rc), (lb, rb)) = m
    letters = iter(string.ascii_letters)
    lhs_l = [next(letters) for _ in lhs]
    rhs_l = [next(letters) for _ in rhs]
    for i, j in zip(lc + lb, rc + rb):
        rhs_l[j] = lhs_l[i]
    out = [lhs_l[i] for i in lb]
    out += [lhs_l[i] for i in range(len(lhs)) if i not in lc and i not in lb]
    out += [rhs_l[j] for j in range(len(rhs)) if j not in rc and j not in rb]
    return f"{''.join(lhs_l)},{''.join(rhs_l)}->{''.join(out)}"


def xla_seconds(matmuls: Counter, timed, reps: int) -> float:
    """Seconds of all the matmuls, each jitted and timed alone (median of reps, dispatch included)
    times its count. `timed` is bench.timed (passed in to keep this module free of the bench's
    imports)."""
    total = 0.0
    for i, (m, count) in enumerate(sorted(matmuls.items())):
        lhs_shape, rhs_shape, dtype, dims = m
        keys = jax.random.split(jax.random.key(i))
        lhs, rhs = jax.random.normal(keys[0], lhs_shape, dtype), jax.random.normal(keys[1], rhs_shape, dtype)
        product = jax.jit(lambda a, b, dims=dims: jax.lax.dot_general(a, b, dims))
        total += count * timed(product, lhs, rhs, reps=reps)
    return total
