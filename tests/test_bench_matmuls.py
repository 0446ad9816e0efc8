"""The step-matmul listing behind bench's "our step's matmuls alone" figures: it finds every matmul
(scan bodies counted per iteration), and its einsum strings run the same products."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cfm_jax import bench, bench_matmuls

DIMS = [  # (lhs shape, rhs shape, dot_general dimension numbers)
    ((6, 4), (4, 5), (((1,), (0,)), ((), ()))),
    ((6, 4), (5, 4), (((1,), (1,)), ((), ()))),
    ((4, 6), (4, 5), (((0,), (0,)), ((), ()))),
    ((3, 6, 4), (3, 5, 4), (((2,), (2,)), ((0,), (0,)))),
    ((2, 7, 3, 4), (2, 3, 4, 5), (((3,), (2,)), ((0, 2), (0, 1)))),
    ((2, 3, 4, 5), (3, 4, 6), (((1, 2), (0, 1)), ((), ()))),
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


def test_xla_and_torch_timings_cover_every_matmul():
    found = bench_matmuls.step_matmuls(lambda a, b: (a @ b) @ b.T, jnp.ones((8, 4)), jnp.ones((4, 4)))
    assert bench_matmuls.xla_seconds(found, bench.timed, reps=2) > 0
    pytest.importorskip("torch")
    from cfm_jax.bench_torch import einsum_seconds

    assert einsum_seconds(found, reps=2) > 0
