"""Sweeps as submitit jobs (`--launcher slurm`), tested with submitit's local executor (no SLURM):
a job killed (SIGKILL) mid-training fails alone, and the same sweep again finishes both cells exactly once."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

pytest.importorskip("submitit")

from cfm_jax import workdir as wd  # noqa: E402
from cfm_jax.harness import launchers  # noqa: E402
from cfm_jax.harness.experiments import load_experiment  # noqa: E402
from cfm_jax.harness.sweep import sweep  # noqa: E402

EXPERIMENT = '''
SEEDS = 1
def cells(scale):
    common = ["model.d_model=32", "model.n_layers=1", "data.seq_len=32", "train.batch_size=4",
              "train.checkpoint_every=5", "data.eval_batches=1"]
    return {"long": [*common, "train.steps=3000"], "short": [*common, "train.steps=5"]}
'''


def _kill_tree(pid: int) -> None:
    """SIGKILL pid and every descendant (read from /proc), children first."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    order, todo = [], [pid]
    while todo:
        p = todo.pop()
        order.append(p)
        todo += children.get(p, [])
    for p in reversed(order):
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.slow  # default tier kept near 10 min on 2 cores; `make test-slow` runs it
def test_killed_job_fails_alone_and_the_relaunch_finishes_each_cell_once(tmp_path):
    (tmp_path / "two.py").write_text(EXPERIMENT)
    experiment = load_experiment(str(tmp_path / "two.py"))
    runs = tmp_path / "runs"
    local = launchers.SlurmOptions(time_min=10, cpus=1, mem_gb=4, cluster="local")
    configs = experiment.configs("smoke")
    cells = [(c, configs[c], runs / "two" / "smoke" / c) for c in configs]
    folder = runs / "_submitit" / "two" / "smoke"
    jobs = dict(launchers.submit_cells(cells, experiment.analyses, folder, local))
    long_dir = runs / "two" / "smoke" / "long"
    deadline = time.time() + 300
    while not list((long_dir / wd.CHECKPOINTS).glob("[0-9]*")) and time.time() < deadline:
        time.sleep(0.5)
    assert time.time() < deadline, "the long cell never saved a checkpoint"
    _kill_tree(jobs["long"]._process.pid)  # a hard kill of the job and its children (cancel() is SIGINT)
    failed = launchers.wait_cells(list(jobs.items()), folder)
    assert failed == ["long"] and not (long_dir / wd.EVAL).exists()
    short_eval = (runs / "two" / "smoke" / "short" / wd.EVAL).stat().st_mtime_ns
    stopped_at = max(r["step"] for r in wd.read_metrics(long_dir))

    assert sweep(experiment, "smoke", runs, progress=False, slurm=local) == []  # the same sweep again
    assert (runs / "two" / "smoke" / "short" / wd.EVAL).stat().st_mtime_ns == short_eval  # not rerun
    steps = [r["step"] for r in wd.read_metrics(long_dir)]
    assert steps == sorted(set(steps)) and steps[-1] == 3000 and 0 < stopped_at < 3000  # resumed, each step once
    assert (long_dir / wd.EVAL).exists()


def test_bad_slurm_options_are_one_line_exit_2(tmp_path, capsys):
    from cfm_jax.cli import main

    (tmp_path / "two.py").write_text(EXPERIMENT)
    code = main(["sweep", str(tmp_path / "two.py"), "--scale", "smoke", "--runs-dir", str(tmp_path / "runs"),
                 "--launcher", "slurm", "--slurm-time", "0"])
    assert code == 2 and "--slurm-time 0 must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_each_sweep_worker_gets_its_own_gpu(monkeypatch):
    """With several GPUs visible, --workers N hands them out round robin, one per worker process,
    before JAX starts there (faked here: CUDA_VISIBLE_DEVICES lists 3 GPUs, the CPU runs the jobs)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from cfm_jax.harness import sweep as sweep_module

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6")
    assert sweep_module.visible_gpus() == ["4", "5", "6"]
    context = multiprocessing.get_context("spawn")
    devices = sweep_module.gpu_queue(context, 2)
    with ProcessPoolExecutor(2, mp_context=context, initializer=sweep_module._worker_init, initargs=(devices,)) as pool:
        seen = set(pool.map(_visible, range(8)))
    assert seen == {"4", "5"}
    assert [d[1] for d in (sweep_module.gpu_queue(context, 5).get() for _ in range(1))] == [2]  # 5 workers, 3 GPUs
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert sweep_module.visible_gpus() == []


def _visible(_):
    import os
    import time

    time.sleep(0.2)  # both workers take tasks
    return os.environ.get("CUDA_VISIBLE_DEVICES")
