"""`cfm-jax sweep`: train then evaluate every cell of an experiment, each in its own workdir.

A cell whose workdir already holds eval.json is skipped, so rerunning a sweep (after a crash or a
kill) finishes what is left; an interrupted cell resumes from its last checkpoint. So is a cell whose
committed run record (experiments/results/runs/..., see records.py) holds a run of its current config,
so a long sweep continues on another machine from what was committed (`retrain=True` ignores records). `workers` runs
cells in parallel processes; `shard=(i, n)` takes every n-th cell starting at i, so n machines can
share one runs directory without touching each other's cells.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from cfm_jax import workdir as wd
from cfm_jax.config import Config
from cfm_jax.errors import TrainingDiverged, UserError
from cfm_jax.harness import lr_grid, records
from cfm_jax.harness.records import cell_workdir  # noqa: F401 - re-exported: callers import it from here
from cfm_jax.harness.experiments import Experiment
from cfm_jax.host_memory import keep_freed_memory


def parse_shard(text: str) -> tuple[int, int]:
    """'i/n' with 0 <= i < n."""
    i, _, n = text.partition("/")
    digits = lambda x: x.isascii() and x.isdigit()
    if not (digits(i) and digits(n) and 0 <= int(i) < int(n)):
        raise UserError(f"--shard {text!r} must be i/n with 0 <= i < n, e.g. 0/4")
    return int(i), int(n)


def run_cell(cfg: Config, workdir: Path, analyses: tuple[str, ...], progress: bool) -> str | None:
    """Train + evaluate one cell; returns an error line if training diverged (also written to the
    workdir as diverged.json, so the sweep and a learning-rate pick count the run as done)."""
    from cfm_jax.harness.evaluate import evaluate
    from cfm_jax.train import train

    try:
        train(cfg, workdir, progress=progress)
    except TrainingDiverged as e:
        wd.write_json(Path(workdir) / wd.DIVERGED, {"error": str(e)})
        return str(e)
    evaluate(workdir, analyses)
    return None


def sweep(experiment: Experiment, scale: str, runs_dir: Path, progress: bool = True, workers: int = 1,
          shard: tuple[int, int] = (0, 1), results_dir: Path | None = None, retrain: bool = False,
          slurm=None) -> list[str]:
    """Run every unfinished cell of this shard; returns the names of cells that failed (diverged).
    results_dir: where committed run records are looked up (None: none are). With LR_GRID, the
    tuning runs go first; each cell's seeds follow once all its tuning runs are done. slurm: a
    launchers.SlurmOptions to run the cells as SLURM jobs (one per cell) instead of here."""
    if workers < 1:
        raise UserError(f"--workers {workers} must be >= 1")
    find = records.finder(experiment.name, scale, runs_dir, None if retrain else results_dir, shared=not retrain)
    failed: list[str] = []
    stale: dict[str, str] = {}  # cell -> why its workdir cannot be resumed
    while True:
        picks = None
        if experiment.lr_grid:
            picked = lr_grid.pick_lrs(experiment, scale, find)
            picks = lr_grid.picks_only(picked)
            waiting = [b for b, p in picked.items() if p["lr"] is None and not p.get("all_diverged")]
            if waiting:
                print(f"learning rate not picked yet for {len(waiting)} cell(s) (tuning runs unfinished): "
                      f"{', '.join(waiting[:5])}{' ...' if len(waiting) > 5 else ''}", file=sys.stderr)
        configs = experiment.configs(scale, picks)  # every run resolves before anything runs
        todo = _unfinished(experiment, scale, runs_dir, configs, shard, find, stale)
        if not todo:
            return _done(failed, stale)
        if slurm is not None:
            from cfm_jax.harness.launchers import run_slurm

            folder = Path(runs_dir) / "_submitit" / experiment.name / scale
            failed_now = run_slurm([(c, configs[c], w) for c, w in todo], experiment.analyses, folder, slurm)
        else:
            failed_now = _run_all(experiment, configs, todo, progress, workers)
        for cell in failed_now:
            if experiment.lr_grid and cell in experiment.tuning_runs(scale):
                print(f"{cell}: a tuning run diverged; its learning rate counts as the worst", file=sys.stderr)
            else:
                failed.append(cell)
        if not experiment.lr_grid:
            return _done(failed, stale)


def _done(failed: list[str], stale: dict[str, str]) -> list[str]:
    """The sweep's result, once every runnable cell ran; cells left stale need the user's decision."""
    if stale:
        cell, why = next(iter(stale.items()))
        raise UserError(f"{len(stale)} cell(s) not run because their workdir holds a run of another config, "
                        f"e.g. {cell}: {why}; move or delete those workdirs to retrain them")
    return failed


def _unfinished(experiment, scale, runs_dir, configs, shard, find, stale: dict[str, str]) -> list[tuple[str, Path]]:
    """The runs of this shard still to train, in order; cells whose workdir holds another config (the
    experiment file was edited since) go to `stale` instead, so the rest of the sweep still runs."""
    if experiment.lr_grid:  # by base cell: the run list grows as learning rates are picked
        bases = list(experiment.base_cells(scale))
        order = lambda n: bases.index(experiment.base_of(n))
        # a picked cell's seeds right after its tuning runs: cells finish in the experiment's order
        # (narrowest first, say) instead of every cell's tuning waiting on the seeds (stable sort)
        names = sorted((n for n in configs if order(n) % shard[1] == shard[0]), key=order)
    else:
        names = list(configs)[shard[0]::shard[1]]
    todo = []
    for i, cell in enumerate(names, 1):
        workdir = records.cell_workdir(runs_dir, experiment.name, scale, cell)
        found = find(cell, configs[cell])
        if found == workdir:
            print(f"[{i}/{len(names)}] {cell}: done, skipped", file=sys.stderr)
        elif found is not None and found.parts[-3] == experiment.name:
            print(f"[{i}/{len(names)}] {cell}: committed record matches, skipped ({found})", file=sys.stderr)
        elif found is not None:
            print(f"[{i}/{len(names)}] {cell}: the same run finished for {found.parts[-3]}, skipped ({found})", file=sys.stderr)
        else:
            try:
                wd.check_compatible(workdir, configs[cell])
            except UserError as e:
                if cell not in stale:
                    print(f"[{i}/{len(names)}] {cell}: NOT RUN: {e}", file=sys.stderr)
                stale[cell] = str(e)
                continue
            todo.append((cell, workdir))
    return todo


def visible_gpus() -> list[str]:
    """GPU ids this process may use, without initializing JAX (which would take their memory):
    CUDA_VISIBLE_DEVICES when set, else the GPUs `nvidia-smi -L` lists; [] without GPUs."""
    import shutil
    import subprocess

    if (visible := os.environ.get("CUDA_VISIBLE_DEVICES")) is not None:
        return [d.strip() for d in visible.split(",") if d.strip() and d.strip() != "-1"]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU ")]


def gpu_queue(context, workers: int):
    """A queue holding each worker's (GPU id, workers on that GPU): round robin over the visible GPUs;
    (None, 1) without GPUs."""
    devices, gpus = context.Queue(), visible_gpus()
    share = -(-workers // len(gpus)) if gpus else 1  # workers per GPU
    for i in range(workers):
        devices.put((gpus[i % len(gpus)] if gpus else None, share))
    return devices


def _exit_with_parent(parent: int, every_s: float = 2.0) -> None:
    """Stop this worker when the sweep process that spawned it is gone (killed, even by SIGKILL):
    otherwise it would finish its cell and start the cells already queued to it, unwatched. Exiting
    mid-training is safe: the cell resumes from its last checkpoint on the next sweep."""
    import threading
    import time

    def watch():
        while os.getppid() == parent:
            time.sleep(every_s)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def _worker_init(devices, parent: int | None = None) -> None:
    """A sweep worker's start: a watch on the sweep process, its own GPU (if any; set before JAX
    starts its backend), then the allocator setting every cfm-jax process uses."""
    if parent is not None:
        _exit_with_parent(parent)
    device, share = devices.get()
    if device is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = device
        if share > 1:  # workers sharing a GPU: split its memory instead of each preallocating 75 %
            os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{0.9 / share:.3f}")
    keep_freed_memory()
    from cfm_jax.registry import load_plugins

    load_plugins()  # kinds from CFM_JAX_PLUGINS, before this worker unpickles a config that uses them


def _run_all(experiment, configs, todo, progress: bool, workers: int) -> list[str]:
    failed = []
    if workers == 1:
        for i, (cell, workdir) in enumerate(todo, 1):
            print(f"[{i}/{len(todo)}] {cell}: training in {workdir}", file=sys.stderr)
            error = run_cell(configs[cell], workdir, experiment.analyses, progress)
            if error:
                print(f"{cell}: FAILED: {error}", file=sys.stderr)
                failed.append(cell)
        return failed
    # Separate processes (spawned: JAX does not survive fork), one cell each at a time.
    # Each reuses freed host memory as the CLI's own process does (cfm_jax.host_memory), and on a
    # machine with several GPUs takes its own (round robin), so workers do not share one device.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init,
                             initargs=(gpu_queue(context, workers), os.getpid())) as pool:
        futures = {cell: pool.submit(run_cell, configs[cell], workdir, experiment.analyses, False) for cell, workdir in todo}
        for cell, future in futures.items():
            error = future.result()
            print(f"{cell}: {'FAILED: ' + error if error else 'done'}", file=sys.stderr)
            if error:
                failed.append(cell)
    return failed
