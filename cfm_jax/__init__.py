"""cfm_jax: neuron-sparse FFNs vs MoE vs dense, attention vs linear mixers, in one block and one harness."""

import os

__version__ = "0.1.0"

# XLA:CPU's default copy insertion keeps two full copies of a donated buffer that a step both reads
# and updates in place (a KV cache: 4 copies of 32 MB per decode step at 16K tokens); its region
# analysis proves the read precedes the write and drops them (decode at 16K: ~10x faster, measured).
# XLA reads XLA_FLAGS when jax creates its first backend, so this holds if cfm_jax is imported before
# any computation runs; a flag the user set wins. CPU-only: other backends ignore it.
CPU_XLA_FLAGS = ("--xla_cpu_copy_insertion_use_region_analysis=true",)


def _add_default_xla_flags() -> None:
    flags = os.environ.get("XLA_FLAGS", "")
    for flag in CPU_XLA_FLAGS:
        if flag.split("=")[0] not in flags:
            flags = f"{flags} {flag}".strip()
    os.environ["XLA_FLAGS"] = flags


_add_default_xla_flags()
