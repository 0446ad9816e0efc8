"""`cfm-jax`: train, eval, sweep, report, list.

    cfm-jax train --workdir runs/a --scale smoke model.ffn=dense model.ffn.activation=relu
    cfm-jax eval --workdir runs/a
    cfm-jax sweep quickstart --scale smoke && cfm-jax report quickstart --scale smoke
    cfm-jax report quickstart --scale smoke   # from the committed run records, no training
    cfm-jax list                  # kinds, tasks, experiments;  cfm-jax list gla  # one kind's fields
    cfm-jax train --workdir runs/b --config runs/a/config.json train.steps=400   # relaunch, changed
    cfm-jax train --workdir runs/c --scale smoke model.ffn=moe --dry-run         # print the config only
    cfm-jax --plugin my_ffn.py train ...   # register kinds from a file or module outside the repository

Bad input (unknown kind or key, wrong type, impossible shape, missing path) prints one line on
stderr and exits with code 2, before anything in a workdir is touched.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from pathlib import Path

from cfm_jax.errors import TrainingDiverged, UserError
from cfm_jax.host_memory import keep_freed_memory

EXIT_BAD_INPUT, EXIT_FAILED = 2, 1


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump), exit code 2 like every other bad input."""

    def error(self, message: str):
        print(f"error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def _workdir(text: str) -> Path:
    if not text.strip():
        raise argparse.ArgumentTypeError("--workdir must name a directory, not ''")
    return Path(text)


def _parser() -> argparse.ArgumentParser:
    from cfm_jax.config import SCALES

    p = _Parser(prog="cfm-jax", description=__doc__.split("\n")[0])
    p.add_argument("--plugin", action="append", default=[], metavar="MODULE_OR_PY",
                   help="import a module or .py file that registers kinds (repeatable; adds to CFM_JAX_PLUGINS)")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train (or resume) one run in a workdir")
    t.add_argument("--workdir", required=True, type=_workdir, help="run directory (created; resumed if present)")
    t.add_argument("--scale", default="cpu", choices=list(SCALES), help="size preset applied before overrides")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--distributed", action="store_true",
                   help="multi-host: call jax.distributed.initialize() first (one process per host)")
    t.add_argument("--reconfigure", action="store_true",
                   help="continue a workdir's checkpoint under a config that differs from its config.json")
    t.add_argument("--config", type=Path, default=None, metavar="CONFIG_JSON",
                   help="start from a recorded run's config.json (the overrides apply on top; --scale is ignored)")
    t.add_argument("--dry-run", action="store_true", help="print the resolved config as JSON and touch nothing")
    t.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. model.d_model=128 train.steps=200")

    e = sub.add_parser("eval", help="evaluate a workdir's latest checkpoint into eval.json")
    e.add_argument("--workdir", required=True, type=_workdir)
    e.add_argument("--analysis", default="", metavar="LIST",
                   help="comma list of neuron analyses (extra forward passes): cett, dynamic, bricks, or all")

    for name, help_ in (("sweep", "train + eval every cell of an experiment"), ("report", "tabulate a sweep")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("experiment", help="name in experiments/ or path to an experiment .py file")
        s.add_argument("--scale", default="cpu", choices=list(SCALES))
        s.add_argument("--runs-dir", type=Path, default=Path("runs"), help="root of the cells' workdirs")
        s.add_argument("--results-dir", type=Path, default=None,
                       help="tables and committed run records (default: experiments/results)")
        if name == "sweep":
            s.add_argument("--retrain", action="store_true", help="train cells whose committed run record matches too")
            s.add_argument("--no-progress", action="store_true")
            s.add_argument("--workers", type=int, default=1, help="cells trained in parallel processes")
            s.add_argument("--shard", default="0/1", help="i/n: run every n-th cell from i (split across machines)")
            s.add_argument("--launcher", default="local", choices=["local", "slurm"],
                           help="local: processes here (--workers); slurm: one SLURM job per cell through submitit")
            s.add_argument("--slurm-partition", default="", help="SLURM partition (default: the cluster's)")
            s.add_argument("--slurm-time", type=int, default=240, help="minutes per job; a job stopped at its limit is requeued and resumes")
            s.add_argument("--slurm-gpus", type=int, default=0, help="GPUs per job")
            s.add_argument("--slurm-cpus", type=int, default=4, help="CPUs per job")
            s.add_argument("--slurm-mem-gb", type=int, default=32, help="memory per job")
            s.add_argument("--slurm-parallel", type=int, default=64, help="at most this many jobs at once")
        else:
            s.add_argument("--force", action="store_true", help="replace an existing table even with runs missing")

    b = sub.add_parser("bench", help="speed / memory benchmarks -> experiments/results/bench[_SCALE].md/.json")
    b.add_argument("--suite", default="all",
                   help="comma list of: ceilings, train, compile, torch, seqlen, decode, sparse_decode, sparse_loss, moe, seed_batch; or all; "
                        "or accel (the accelerator run in bf16 -> bench_SCALE_DEVICE.md)")
    b.add_argument("--scale", default="cpu", choices=list(SCALES))
    b.add_argument("--out", type=Path, default=None, help="default: experiments/results")
    b.add_argument("--update", action="store_true",
                   help="re-measure only these suites and keep the others from the existing bench json")
    b.add_argument("--force", action="store_true", help="replace an existing bench file that holds other suites")

    ls = sub.add_parser("list", help="registered ffn and mixer kinds, tasks, experiments; or one kind's fields")
    ls.add_argument("name", nargs="?", default=None,
                    help="an ffn or mixer kind, or model / train / data: print its fields, types, defaults and comments")
    return p


def _run(args: argparse.Namespace) -> int:
    if args.command == "train":
        from cfm_jax.config import load_config_json, resolve, to_dict
        from cfm_jax.train import train

        base = load_config_json(args.config) if args.config else None
        cfg = resolve(args.scale, args.overrides, base=base)
        if args.dry_run:
            print(json.dumps(to_dict(cfg), indent=2))
            return 0

        if args.distributed:
            import jax

            try:
                jax.distributed.initialize()
            except Exception as e:  # noqa: BLE001 - jax raises several types for a missing cluster
                raise UserError(f"--distributed: jax.distributed.initialize() failed ({str(e).splitlines()[0][:200]}); "
                                "run it under a cluster launcher (SLURM, ...) or set JAX_COORDINATOR_ADDRESS, "
                                "JAX_NUM_PROCESSES and JAX_PROCESS_ID") from None

        last = train(cfg, args.workdir, progress=not args.no_progress,
                     reconfigure=args.reconfigure)
        print(json.dumps({k: last[k] for k in ("step", "loss", "tokens", "seconds") if k in last}))
    elif args.command == "eval":
        from cfm_jax.harness.evaluate import ANALYSES, evaluate

        analyses = [a.strip() for a in args.analysis.split(",") if a.strip()]
        result = evaluate(args.workdir, ANALYSES if analyses == ["all"] else tuple(analyses))
        print(json.dumps({"step": result["step"], "params_total": result["params_total"], **result["metrics"]}, indent=2))
    elif args.command == "sweep":
        from cfm_jax.harness.experiments import experiments_dir, load_experiment
        from cfm_jax.harness.sweep import parse_shard, sweep

        slurm = None
        if args.launcher == "slurm":
            from cfm_jax.harness.launchers import SlurmOptions

            for flag in ("slurm_time", "slurm_cpus", "slurm_mem_gb", "slurm_parallel", "slurm_gpus"):
                if getattr(args, flag) < (0 if flag == "slurm_gpus" else 1):
                    raise UserError(f"--{flag.replace('_', '-')} {getattr(args, flag)} must be >= {0 if flag == 'slurm_gpus' else 1}")
            slurm = SlurmOptions(args.slurm_partition, args.slurm_time, args.slurm_gpus, args.slurm_cpus,
                                 args.slurm_mem_gb, args.slurm_parallel, os.environ.get("CFM_JAX_SUBMITIT_CLUSTER") or None)
        failed = sweep(load_experiment(args.experiment), args.scale, args.runs_dir, progress=not args.no_progress,
                       workers=args.workers, shard=parse_shard(args.shard),
                       results_dir=args.results_dir or experiments_dir() / "results", retrain=args.retrain, slurm=slurm)
        if failed:
            print(f"error: {len(failed)} cell(s) failed: {', '.join(failed)}", file=sys.stderr)
            return EXIT_FAILED
    elif args.command == "report":
        from cfm_jax.harness.experiments import experiments_dir, load_experiment
        from cfm_jax.harness.report import report

        results_dir = args.results_dir or experiments_dir() / "results"
        path, table = report(load_experiment(args.experiment), args.scale, args.runs_dir, results_dir, force=args.force)
        print(table)
        print(f"wrote {path} and {path.with_suffix('.csv')}", file=sys.stderr)
    elif args.command == "bench":
        from cfm_jax import bench
        from cfm_jax.harness.experiments import experiments_dir

        command = f"cfm-jax bench --suite {args.suite} --scale {args.scale}" + (" --update" if args.update else "")
        out_dir = args.out or experiments_dir() / "results"
        if args.suite == "accel":  # its own file per device, measured whole (no --update)
            print(bench.write(bench.run_accel(args.scale), out_dir, command).read_text())
            return 0
        suites = bench.SUITES if args.suite == "all" else tuple(x.strip() for x in args.suite.split(",") if x.strip())
        existing = bench.read(out_dir, args.scale)
        dropped = sorted(set((existing or {}).get("measured_at", {})) - set(suites))
        if dropped and not (args.update or args.force):
            raise UserError(f"--suite {args.suite!r} would replace {bench._stem(args.scale)}.md in {out_dir}, which also "
                            f"holds {', '.join(dropped)}; --update keeps them, --force replaces the file anyway")
        result = bench.run(suites, args.scale)
        if args.update:
            result = bench.merge(bench.read(out_dir, args.scale), result)
        path = bench.write(result, out_dir, command)
        print(path.read_text())
    elif args.command == "list":
        from cfm_jax import registry
        from cfm_jax.data import TASKS
        from cfm_jax.harness.experiments import list_experiments

        if args.name:
            from cfm_jax.config import describe_fields

            print(describe_fields(args.name))
            return 0
        for slot in registry.SLOTS:
            print(f"{slot}: {', '.join(registry.kinds(slot))}")
        print(f"tasks: {', '.join(sorted(TASKS))}")
        print(f"experiments: {', '.join(list_experiments())}")
    return 0


def _add_plugins(specs: list[str]) -> None:
    """--plugin: appended to CFM_JAX_PLUGINS (paths made absolute), so child processes load them too."""
    from cfm_jax.registry import PLUGINS_ENV

    specs = [str(Path(x).expanduser().resolve()) if x.endswith(".py") else x for x in specs]
    current = [x for x in os.environ.get(PLUGINS_ENV, "").split(",") if x]
    os.environ[PLUGINS_ENV] = ",".join(current + [x for x in specs if x not in current])


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _add_plugins(args.plugin)
    keep_freed_memory()  # before jax allocates: XLA:CPU's per-step buffers are then reused, not refaulted
    try:
        return _run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as e:  # a workdir that is a file, a read-only or full disk: one line, not a traceback
        where = f" ({e.filename})" if e.filename else ""
        full = e.errno in (errno.ENOSPC, errno.EDQUOT)
        print(f"error: {e.strerror or e}{where}" + ("; the last complete checkpoint is kept, rerun to resume "
                                                    "once there is space" if full else ""), file=sys.stderr)
        if full:  # orbax's writer threads may still print their failed writes' tracebacks while Python exits
            sys.stderr.flush()
            os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
        return EXIT_FAILED if full else EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
