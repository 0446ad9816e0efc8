"""The benchmark suite (`cfm-jax bench`): `suite` runs and writes it; `timing` holds its timers,
`matmuls` lists a step's matmuls, `predictor` measures predicted sparse decode, `torch_twin` is the
PyTorch eager twin the dense step is compared with (optional: needs torch)."""

from cfm_jax.bench.suite import SUITES, _stem, active_rows_ffn, merge, read, run, run_accel, write  # noqa: F401
from cfm_jax.bench.timing import counting_faults, paired_rounds, timed  # noqa: F401
