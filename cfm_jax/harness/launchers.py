"""Where a sweep's cells run: here (`--launcher local`, processes on this machine, the default) or
as SLURM jobs through submitit (`--launcher slurm`), one job per cell.

A SLURM job that times out or is preempted is requeued by submitit (the job is `Checkpointable`) and
resumes from the cell's last checkpoint, as any interrupted cell does; a job that dies otherwise
counts as failed and the next `cfm-jax sweep` (same command) runs what is unfinished. `cluster=
"local"` uses submitit's local executor (subprocesses, no SLURM), which the tests use.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from cfm_jax.errors import UserError, one_line


@dataclass(frozen=True)
class SlurmOptions:
    partition: str = ""  # --slurm-partition ("" = the cluster's default)
    time_min: int = 240  # --slurm-time: minutes per job before SLURM stops it (then it is requeued)
    gpus: int = 0  # --slurm-gpus: GPUs per job
    cpus: int = 4  # --slurm-cpus: CPUs per job
    mem_gb: int = 32  # --slurm-mem-gb
    parallel: int = 64  # --slurm-parallel: at most this many jobs at once (array parallelism)
    cluster: str | None = None  # None = SLURM (submitit's auto-detection); "local" = subprocesses, for tests


def _submitit():
    try:
        import submitit
    except ImportError:
        raise UserError("--launcher slurm needs the submitit package: pip install 'cfm-jax[cluster]' "
                        "(or pip install submitit)") from None
    return submitit


def _cell_job_class():
    submitit = _submitit()

    class CellJob(submitit.helpers.Checkpointable):
        """One cell: train (resuming from its checkpoint when requeued) then evaluate."""

        def __call__(self, cfg: dict, workdir: str, analyses: tuple[str, ...]):
            """cfg: the config as a dict (to_dict), rebuilt here once plugins are loaded, so a kind from
            a plugin file need not be importable when the job is unpickled."""
            from cfm_jax.config import from_dict
            from cfm_jax.harness.sweep import run_cell
            from cfm_jax.host_memory import keep_freed_memory

            keep_freed_memory()
            return run_cell(from_dict(cfg), Path(workdir), analyses, progress=False)

    return CellJob


def submit_cells(cells: list[tuple[str, object, Path]], analyses: tuple[str, ...], folder: Path,
                 options: SlurmOptions) -> list[tuple[str, object]]:
    """Submit (cell, config, workdir) as one job each (a job array); returns [(cell, submitit job)]."""
    from cfm_jax.config import to_dict

    submitit = _submitit()
    executor = submitit.AutoExecutor(folder=str(folder), cluster=options.cluster)
    params = dict(timeout_min=options.time_min, cpus_per_task=options.cpus, mem_gb=options.mem_gb)
    if options.cluster != "local":  # SLURM-only parameters
        params["slurm_array_parallelism"] = options.parallel
        if options.partition:
            params["slurm_partition"] = options.partition
    if options.gpus:
        params["gpus_per_node"] = options.gpus
    executor.update_parameters(**params)
    job_cls = _cell_job_class()
    with executor.batch():
        jobs = [(cell, executor.submit(job_cls(), to_dict(cfg), str(workdir), analyses)) for cell, cfg, workdir in cells]
    for cell, job in jobs:
        print(f"{cell}: submitted as job {job.job_id}", file=sys.stderr)
    return jobs


def wait_cells(jobs: list[tuple[str, object]], folder: Path) -> list[str]:
    """Wait for every job; returns the cells that failed (a diverged run, or a job that died or was
    cancelled: its log is in `folder`)."""
    failed = []
    for cell, job in jobs:
        try:
            error = job.result()
        except Exception as e:  # noqa: BLE001 - a job that died: named, the sweep goes on
            error = f"job {job.job_id} failed ({one_line(e)}); log in {folder}"
        print(f"{cell}: {'FAILED: ' + error if error else 'done'}", file=sys.stderr)
        if error:
            failed.append(cell)
    return failed


def run_slurm(cells: list[tuple[str, object, Path]], analyses: tuple[str, ...], folder: Path,
              options: SlurmOptions) -> list[str]:
    """Submit every cell as a job and wait; returns the cells that failed."""
    return wait_cells(submit_cells(cells, analyses, folder, options), folder)
