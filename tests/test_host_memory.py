"""cfm_jax.host_memory: XLA:CPU's large per-call buffers are reused instead of page-faulted anew."""

import json
import os
import platform
import subprocess
import sys

import pytest

from cfm_jax import host_memory

glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")

# Each call returns a fresh 256 MB array (one malloc over glibc's 32 MB mmap limit), dropped at once.
PROBE = """
import json, resource, sys
from cfm_jax.host_memory import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
import jax, jax.numpy as jnp
f = jax.jit(lambda x: x * 2.0)
x = jnp.ones((64 * 2**20,), jnp.float32)
faults = []
for _ in range(24):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": faults}))
"""


def _probe(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], check=True, capture_output=True, text=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc_only
def test_freed_buffers_are_reused_not_refaulted():
    kept, plain = _probe("keep"), _probe("plain")
    assert kept["applied"] and not plain["applied"]
    # 256 MB is 65536 small pages (128 huge ones where transparent huge pages are always on): the
    # plain allocator maps it anew each call, the kept one hands back the same memory.
    # The last 4 of 24 calls: the kept heap grows over the first few (a buffer can be freed after the
    # next is allocated, so it grows to hold two or three), then stops growing.
    kept_faults, plain_faults = max(kept["faults"][-4:]), min(plain["faults"][-4:])
    assert plain_faults >= 100, plain
    assert kept_faults < min(20, plain_faults / 4), (kept, plain)


def test_opt_out_changes_nothing(monkeypatch):
    monkeypatch.setenv(host_memory.ENV, "0")
    assert host_memory.keep_freed_memory() is False
