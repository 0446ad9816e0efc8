"""Keep freed host memory for reuse, so XLA:CPU's per-step buffers do not page-fault every step.

XLA:CPU allocates each call's temporaries as one malloc'ed buffer (1.9 GB for the cpu-scale dense
training step) and frees it when the call returns. glibc serves any request over 32 MB with a fresh
mmap and returns it with munmap, so every step first-touches all of it again: about 500,000 page
faults and 0.8 s of kernel time per cpu-scale step (measured with getrusage; `bench.md` has the
step-time effect). Turning mmap off and trimming off makes glibc keep freed memory in its heap and
hand it back out on the next step, as a caching allocator would.

The costs: the process keeps its peak memory until it exits (the usual trade of caching allocators;
a sweep worker keeps the largest peak of the cells it ran), its threads share one malloc lock, and
the heap grows past the plain allocator's footprint before it settles, because small allocations
land in freed large chunks and the next large request then no longer fits (glibc splits free chunks
before it extends the heap). Measured (2026-12-07): the cpu-scale bench training step settles at
5.8 GB resident after ~10 steps against 2.9 GB with the plain allocator, and from then on takes 0
page faults per step against ~300,000; a loop over one 64 MB result settles at ~10 buffers' worth
within 10-30 calls.
Set CFM_JAX_KEEP_FREED_MEMORY=0 to leave the allocator as it is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

# mallopt parameters from glibc's <malloc.h>
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
ENV = "CFM_JAX_KEEP_FREED_MEMORY"


def keep_freed_memory() -> bool:
    """Set glibc's allocator to reuse freed memory instead of returning it to the OS. Returns whether
    it was applied: False where CFM_JAX_KEEP_FREED_MEMORY=0 or the C library is not glibc (macOS,
    musl), where nothing is changed, or where glibc refused a setting (the others stay applied).
    Affects allocations made after the call, so call it early."""
    if os.environ.get(ENV, "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # One arena: XLA's worker threads would otherwise allocate from per-thread arenas, which cannot
    # hold a request this large and fall back to mmap even with mmap turned off. Trim -1: never.
    settings = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))
    done = [mallopt(param, value) == 1 for param, value in settings]
    return all(done)
