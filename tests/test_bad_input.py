"""Bad input across the CLI: each case prints one `error: ...` line, exits 2, and leaves an existing
workdir exactly as it was."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from cfm_jax.cli import main

TINY = ["model.d_model=32", "data.seq_len=32", "train.batch_size=4", "data.eval_batches=1", "train.steps=4"]
TRAIN = lambda w, *extra: ["train", "--workdir", str(w), "--scale", "smoke", "--no-progress", *TINY, *extra]

# (argv builder taking (workdir, tmp), fragment expected in the error line)
CASES = {
    "unknown ffn kind": (lambda w, t: TRAIN(w, "model.ffn=nonexistent"), "unknown ffn kind 'nonexistent'; allowed:"),
    "unknown mixer kind": (lambda w, t: TRAIN(w, "model.mixer=nonexistent"), "unknown mixer kind 'nonexistent'; allowed:"),
    "unknown model key": (lambda w, t: TRAIN(w, "model.bogus=1"), "unknown key 'model.bogus'"),
    "unknown train key": (lambda w, t: TRAIN(w, "train.bogus=1"), "unknown key 'train.bogus'"),
    "unknown data key": (lambda w, t: TRAIN(w, "data.bogus=1"), "unknown key 'data.bogus'"),
    "unknown slot field": (lambda w, t: TRAIN(w, "model.ffn.bogus=1"), "unknown key 'model.ffn.bogus'"),
    "unknown section": (lambda w, t: TRAIN(w, "optim.lr=1"), "unknown key 'optim.lr'"),
    "not key=value": (lambda w, t: TRAIN(w, "justtext"), "not of the form key=value"),
    "int expected": (lambda w, t: TRAIN(w, "model.d_model=wide"), "model.d_model='wide' is not an int"),
    "int not float": (lambda w, t: TRAIN(w, "train.steps=1.5"), "train.steps='1.5' is not an int"),
    "float expected": (lambda w, t: TRAIN(w, "train.lr=fast"), "train.lr='fast' is not a float"),
    "bool expected": (lambda w, t: TRAIN(w, "model.tie_embeddings=maybe"), "allowed: true, false"),
    "choice expected": (lambda w, t: TRAIN(w, "model.ffn.activation=tanh"), "allowed: swiglu, gelu, relu"),
    "heads do not divide": (lambda w, t: TRAIN(w, "model.d_model=66"), "must be >= 1 and divide model.d_model=66"),
    "kv heads": (lambda w, t: TRAIN(w, "model.mixer.n_kv_heads=3"), "n_kv_heads=3 must divide n_heads=4"),
    "causal block": (lambda w, t: TRAIN(w, "model.mixer.causal_block=-2"), "causal_block=-2 must be >= 0"),
    "zero width": (lambda w, t: TRAIN(w, "model.d_model=0"), "model.d_model=0 must be > 0"),
    "zero steps": (lambda w, t: TRAIN(w, "train.steps=0"), "train.steps=0 must be > 0"),
    "negative batch": (lambda w, t: TRAIN(w, "train.batch_size=-1"), "train.batch_size=-1 must be > 0"),
    "zero lr": (lambda w, t: TRAIN(w, "train.lr=0"), "train.lr=0.0 must be > 0"),
    "min lr ratio": (lambda w, t: TRAIN(w, "train.min_lr_ratio=2"), "train.min_lr_ratio must be in [0, 1]"),
    "unknown task": (lambda w, t: TRAIN(w, "data.task=images"), "unknown data.task 'images'"),
    "missing data path": (lambda w, t: TRAIN(w, "data.path=/no/such/dir"), "does not exist"),
    "data path without text": (lambda w, t: TRAIN(t / "fresh", f"data.path={t / 'binary'}"), "holds no readable UTF-8 text"),
    "mqar does not fit": (lambda w, t: TRAIN(w, "data.task=mqar", "data.num_kv_pairs=100"), "needs seq_len >= 400"),
    "needle depth": (lambda w, t: TRAIN(w, "data.task=passkey", "data.needle_depth=2"), "must be in [0, 1] or -1"),
    "queries > needles": (lambda w, t: TRAIN(w, "data.task=niah_multiquery", "data.num_queries=9"), "queries <= needles"),
    "selective copy does not fit": (lambda w, t: TRAIN(w, "data.task=selective_copying", "data.num_targets=100"), "needs length >= 200"),
    "pattern length": (lambda w, t: TRAIN(w, "model.layers=attention*3"), "not a multiple of the layer pattern length 3"),
    "kind in pattern": (lambda w, t: TRAIN(w, "model.layers=attention+bogus"), "unknown mixer kind 'bogus'"),
    "mesh axis": (lambda w, t: TRAIN(w, "train.mesh=model:2"), "bad train.mesh entry 'model:2'"),
    "experts vs mesh": (lambda w, t: TRAIN(t / "fresh", "model.ffn=moe", "model.ffn.n_experts=6", "train.mesh=data:2,expert:4"),
                        "n_experts=6 is not divisible by the mesh's expert axis (4 devices)"),
    "moe top-k": (lambda w, t: TRAIN(w, "model.ffn=moe", "model.ffn.top_k=99"), "top_k=99 must be in [1, n_experts=8]"),
    "mamba d_state": (lambda w, t: TRAIN(w, "model.mixer=mamba", "model.mixer.d_state=0"), "d_state=0"),
    "window": (lambda w, t: TRAIN(w, "model.mixer=sliding_window", "model.mixer.window=0"), "window=0"),
    "mesh too big": (lambda w, t: TRAIN(t / "fresh", "train.mesh=data:64"), "needs 64 devices"),
    "negative threshold": (lambda w, t: TRAIN(w, "model.ffn=neuron_sparse", "model.ffn.threshold=-1"), "threshold=-1.0 must be >= 0"),
    "top-k too large": (lambda w, t: TRAIN(w, "model.ffn=neuron_sparse", "model.ffn.top_k=100000"), "must be in [0, d_ff=128]"),
    "unknown scale": (lambda w, t: ["train", "--workdir", str(w), "--scale", "huge"], "invalid choice: 'huge'"),
    "different config": (lambda w, t: TRAIN(w, "model.d_model=64"), "holds a different config"),
    "corrupt checkpoint": (lambda w, t: TRAIN(t / "corrupt", "train.steps=8"), "cannot be restored"),
    "eval corrupt checkpoint": (lambda w, t: ["eval", "--workdir", str(t / "corrupt")], "cannot be restored"),
    "eval not a workdir": (lambda w, t: ["eval", "--workdir", str(t / "nothing")], "is not a workdir"),
    "unknown analysis": (lambda w, t: ["eval", "--workdir", str(w), "--analysis", "nope"], "unknown analysis 'nope'"),
    "unknown experiment": (lambda w, t: ["sweep", "no_such_experiment"], "unknown experiment 'no_such_experiment'"),
    "experiment syntax error": (lambda w, t: ["sweep", str(t / "syntax.py"), "--runs-dir", str(t / "runs")], "does not load"),
    "experiment without cells": (lambda w, t: ["sweep", str(t / "nocells.py"), "--runs-dir", str(t / "runs")], "defines no cells(scale)"),
    "experiment bad cells": (lambda w, t: ["sweep", str(t / "badcells.py"), "--runs-dir", str(t / "runs")], "must return a non-empty dict"),
    "experiment bad cell override": (lambda w, t: ["sweep", str(t / "badoverride.py"), "--runs-dir", str(t / "runs")], "cell 'a': unknown ffn kind"),
    "bad shard": (lambda w, t: ["sweep", "quickstart", "--shard", "3/2", "--runs-dir", str(t / "runs")], "--shard '3/2' must be i/n"),
    "bad workers": (lambda w, t: ["sweep", "quickstart", "--workers", "0", "--runs-dir", str(t / "runs")], "--workers 0 must be >= 1"),
    "report unknown experiment": (lambda w, t: ["report", "nope"], "unknown experiment 'nope'"),
    "report over a table with runs missing": (
        lambda w, t: ["report", "quickstart", "--scale", "smoke", "--runs-dir", str(t / "runs"), "--results-dir", str(t / "results")],
        "refusing to replace"),
    "empty workdir": (lambda w, t: ["train", "--workdir", "", "--scale", "smoke", *TINY], "--workdir must name a directory"),
    "checkpoints without config.json": (lambda w, t: TRAIN(t / "noconfig"), "holds checkpoints but no config.json"),
    "cell name leaving the runs dir": (lambda w, t: ["sweep", str(t / "dotdot.py"), "--runs-dir", str(t / "runs")], "bad cell name '..'"),
    "unicode shard": (lambda w, t: ["sweep", "quickstart", "--shard", "²/3", "--runs-dir", str(t / "runs")], "must be i/n"),
    "model too big for memory": (lambda w, t: TRAIN(t / "fresh", "model.d_model=65536"), "more than the"),
    "workdir is a file": (lambda w, t: TRAIN(t / "binary" / "blob.bin"), "blob.bin"),
    "distributed without a cluster": (lambda w, t: [*TRAIN(t / "fresh"), "--distributed"], "--distributed: jax.distributed.initialize() failed"),
    "bench over other suites": (lambda w, t: ["bench", "--suite", "moe", "--scale", "smoke", "--out", str(t / "results")],
                                "would replace bench_smoke.md"),
    "bench with no suite": (lambda w, t: ["bench", "--suite", ",", "--out", str(t / "results")], "--suite names no suite"),
}


def snapshot(root: Path) -> dict:
    return {p: (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else None) for p in root.rglob("*")}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    t = tmp_path_factory.mktemp("bad")
    workdir = t / "run"
    assert main(TRAIN(workdir)) == 0
    assert main(["eval", "--workdir", str(workdir)]) == 0
    shutil.copytree(workdir, t / "corrupt")
    latest = max((p for p in (t / "corrupt" / "checkpoints").iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    for f in latest.rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    (t / "binary").mkdir()
    (t / "binary" / "blob.bin").write_bytes(bytes(range(128, 256)) * 4)
    (t / "syntax.py").write_text("def cells(scale:\n")
    (t / "nocells.py").write_text("X = 1\n")
    (t / "badcells.py").write_text("def cells(scale):\n    return []\n")
    (t / "badoverride.py").write_text("def cells(scale):\n    return {'a': ['model.ffn=nope']}\n")
    (t / "dotdot.py").write_text("def cells(scale):\n    return {'..': []}\n")
    shutil.copytree(workdir, t / "noconfig")
    (t / "noconfig" / "config.json").unlink()
    (t / "results").mkdir()
    (t / "results" / "quickstart_smoke.md").write_text("a finished table\n")  # what a bad command must not overwrite
    (t / "results" / "bench_smoke.md").write_text("a finished bench\n")
    (t / "results" / "bench_smoke.json").write_text('{"scale": "smoke", "measured_at": {"train": "x", "moe": "y"}}\n')
    return workdir, t


def test_there_are_at_least_30_cases():
    assert len(CASES) >= 30


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(setup, capsys, name):
    workdir, t = setup
    argv, fragment = CASES[name]
    argv = argv(workdir, t)
    before = snapshot(t)
    try:
        code = main(argv)
    except SystemExit as e:  # argparse errors exit from inside parse_args
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert fragment in err, err
    assert "Traceback" not in err
    after = snapshot(t)
    assert {p: v for p, v in after.items() if "runs" not in p.parts} == {p: v for p, v in before.items() if "runs" not in p.parts}
    assert not (t / "runs").exists() or not any((t / "runs").rglob("*.json"))
    assert not (t / "fresh").exists(), "a failed start creates no workdir"


@pytest.mark.parametrize("kind", ["immutable", "read-only"])
def test_unwritable_workdir_is_one_line(tmp_path, capsys, kind):
    """An immutable directory (chattr +i binds root too) or a read-only file system: one error line,
    exit 2. Skipped where the directory cannot be made so (not root, no chattr, no tmpfs)."""
    import subprocess

    target = tmp_path / "w"
    target.mkdir()
    if kind == "immutable":
        setup, undo, workdir = ["chattr", "+i", str(target)], ["chattr", "-i", str(target)], target
    else:
        setup, undo, workdir = ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(target)], ["umount", str(target)], target / "run"
    try:
        made = subprocess.run(setup, capture_output=True).returncode == 0
    except FileNotFoundError:
        made = False
    if not made:
        pytest.skip(f"cannot make a {kind} directory here")
    try:
        code = main(TRAIN(workdir))
    finally:
        subprocess.run(undo, capture_output=True)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert ("Operation not permitted" if kind == "immutable" else "Read-only file system") in err
