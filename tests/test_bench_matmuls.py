"""The step-matmul listing behind bench's "our step's matmuls alone" figures: it finds every matmul
(scan bodies counted per iteration), and its einsum strings run the same products."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cfm_jax.bench import suite as bench
from cfm_jax.bench import matmuls as bench_matmuls

DIMS = [  # (lhs shape, rhs shape, dot_general dimension numbers)
    ((6, 4), (4, 5), (((1,), (0,)), ((), ()))),
    ((6, 4), (5, 4), (((1,), (1,)), ((), ()))),
    ((4, 6), (4, 5), (((0,), (0,)), ((), ()))),
    ((3, 6, 4), (3, 5, 4), (((2,), (2,)), ((0,), (0,)))),
    ((2, 7, 3, 4), (2, 3, 4, 5), (((3,), (2,)), ((0, 2), (0, 1)))),
    ((2, 3, 4, 5), (3, 4, 6), (((1, 2), (0, 1)), ((), ()))),
    ((4, 6, 3, 2), (3, 5, 2, 4), (((3,), (2,)), ((2, 0), (0, 3)))),  # batch axes out of order
]


@pytest.mark.parametrize("lhs_shape,rhs_shape,dims", DIMS)
def test_einsum_spec_and_flops_match_dot_general(lhs_shape, rhs_shape, dims):
    rng = np.random.default_rng(0)
    lhs, rhs = rng.normal(size=lhs_shape).astype(np.float32), rng.normal(size=rhs_shape).astype(np.float32)
    m = (lhs_shape, rhs_shape, "float32", dims)
    expected = jax.lax.dot_general(lhs, rhs, dims)
    np.testing.assert_allclose(np.einsum(bench_matmuls.einsum_spec(m), lhs, rhs), expected, rtol=1e-5, atol=1e-5)
    contracted = np.prod([lhs_shape[i] for i in dims[0][0]])
    assert bench_matmuls.flops(m) == 2 * expected.size * contracted


def test_step_matmuls_finds_every_matmul_and_counts_scan_iterations():
    x, w1, w2 = jnp.ones((8, 4)), jnp.ones((4, 16)), jnp.ones((16, 4))

    def loss(w1, w2):
        return jnp.sum(jnp.tanh(x @ w1) @ w2)

    found = bench_matmuls.step_matmuls(jax.jit(jax.grad(loss, argnums=(0, 1))), w1, w2)
    assert sum(found.values()) == 5  # forward 2; backward: dw2, dh, dw1 (x is not differentiated)
    assert ((8, 4), (4, 16), "float32", (((1,), (0,)), ((), ()))) in found

    def scanned(w):
        return jax.lax.scan(lambda h, _: (jnp.tanh(h @ w), None), jnp.ones((2, 4)), None, length=7)[0]

    assert sum(bench_matmuls.step_matmuls(scanned, jnp.ones((4, 4))).values()) == 7

    def nested(w):  # a scan inside a scan, under remat: 3 * 7 matmuls
        inner = jax.checkpoint(lambda h: scanned_from(h, w))
        return jax.lax.scan(lambda h, _: (inner(h), None), jnp.ones((2, 4)), None, length=3)[0]

    def scanned_from(h, w):
        return jax.lax.scan(lambda h, _: (jnp.tanh(h @ w), None), h, None, length=7)[0]

    assert sum(bench_matmuls.step_matmuls(nested, jnp.ones((4, 4))).values()) == 21


@pytest.mark.parametrize("loop", ["while", "cond"])
def test_step_matmuls_refuses_loops_it_cannot_count(loop):
    w = jnp.ones((4, 4))
    if loop == "while":
        fn = lambda h: jax.lax.while_loop(lambda c: c[1] < c[0].sum(), lambda c: (c[0] @ w, c[1] + 1), (h, 0))[0]  # noqa: E731
    else:
        fn = lambda h: jax.lax.cond(h.sum() > 0, lambda h: h @ w, lambda h: h, h)  # noqa: E731
    with pytest.raises(NotImplementedError, match=loop):
        bench_matmuls.step_matmuls(fn, jnp.ones((2, 4)))


def test_xla_and_torch_timings_cover_every_matmul():
    found = bench_matmuls.step_matmuls(lambda a, b, c: a @ b @ c @ b, jnp.ones((8, 4)), jnp.ones((4, 6)), jnp.ones((6, 4)))
    assert len(found) == 2 and sum(found.values()) == 3
    timed_shapes = []

    def fake_timed(fn, lhs, rhs, reps):  # one second per call: the total is the weighted count
        timed_shapes.append((lhs.shape, rhs.shape))
        assert fn(lhs, rhs).shape[0] == lhs.shape[0]
        return 1.0

    assert bench_matmuls.xla_seconds(found, fake_timed, reps=2) == 3.0
    assert sorted(timed_shapes) == sorted((m[0], m[1]) for m in found)
    assert bench_matmuls.xla_seconds(found, bench.timed, reps=2) > 0
    pytest.importorskip("torch")
    from cfm_jax.bench.torch_twin import einsum_seconds

    assert einsum_seconds(found, reps=2) > 0
