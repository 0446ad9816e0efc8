"""Timing helpers of the benchmark suite: median wall time, paired rounds, page-fault counting."""

from __future__ import annotations

import resource
import statistics
import time

import jax


def timed(fn, *args, reps: int) -> float:
    """Median wall seconds of fn(*args) (blocked until ready) over reps calls, after one warm-up."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def counting_faults(fn, counts: list):
    """fn, appending the minor page faults of each call to counts (getrusage: first touches of fresh
    memory, whose cost lands inside a timed step)."""
    def run():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        fn()
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return run


def paired_rounds(a, b, n: int) -> list[list[float]]:
    """n rounds of [seconds of a(), seconds of b()], run back to back; who goes first alternates, so
    neither always runs right after the other (thread pools still spinning, warm caches)."""
    rounds = []
    for i in range(n):
        first, second = (a, b) if i % 2 == 0 else (b, a)
        times = []
        for fn in (first, second):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        rounds.append(times if i % 2 == 0 else times[::-1])
    return rounds
