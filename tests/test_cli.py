"""The `cfm-jax` command end to end, and its handling of bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cfm_jax import workdir as wd
from cfm_jax.cli import main

TINY = ["model.d_model=32", "data.seq_len=32", "train.batch_size=4", "data.eval_batches=1"]


def cli(*args: str) -> subprocess.CompletedProcess:
    """Run the installed console script in a fresh process, as a user would."""
    exe = Path(sys.executable).parent / "cfm-jax"
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})


def snapshot(root: Path) -> dict:
    return {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in root.rglob("*")}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A workdir trained 20 then 40 steps and evaluated, through the real command line."""
    workdir = tmp_path_factory.mktemp("run") / "w"
    for steps in (20, 40):
        out = cli("train", "--workdir", str(workdir), "--scale", "smoke", "--no-progress", *TINY, f"train.steps={steps}")
        assert out.returncode == 0, out.stderr
    out = cli("eval", "--workdir", str(workdir))
    assert out.returncode == 0, out.stderr
    return workdir


def test_train_twice_then_eval(trained):
    steps = [r["step"] for r in wd.read_metrics(trained)]
    assert steps == sorted(set(steps)) and steps[-1] == 40 and any(s > 20 for s in steps)
    for row in wd.read_metrics(trained):
        assert {"step", "loss", "lr", "tokens", "seconds"} <= set(row)
    saved = json.loads((trained / "config.json").read_text())
    assert saved["config"]["train"]["steps"] == 40 and saved["git_commit"]
    result = json.loads((trained / "eval.json").read_text())
    assert result["step"] == 40 and result["params_total"] > result["params_non_embedding"] > 0
    assert 0 < result["sets"]["val"]["bits_per_byte"] < 8.5


@pytest.mark.parametrize("args,fragment", [
    (["model.ffn=nonexistent"], "unknown ffn kind 'nonexistent'; allowed:"),
    (["model.bogus=1"], "unknown key 'model.bogus'"),
    (["model.d_model=wide"], "is not an int"),
    (["model.d_model=66"], "must be >= 1 and divide model.d_model=66"),
    (["data.path=/no/such/dir"], "does not exist"),
    (["model.d_model=64"], "holds a different config"),
])
def test_bad_train_input(trained, capsys, args, fragment):
    before = snapshot(trained)
    code = main(["train", "--workdir", str(trained), "--scale", "smoke", "--no-progress", *TINY, "train.steps=40", *args])
    err = capsys.readouterr().err
    assert code == 2
    assert fragment in err and err.count("\n") == 1 and err.startswith("error: ")
    assert snapshot(trained) == before


def test_bad_input_in_a_fresh_process_has_no_traceback(tmp_path):
    out = cli("train", "--workdir", str(tmp_path / "new"), "--scale", "smoke", "model.ffn=nonexistent")
    assert out.returncode == 2
    assert out.stderr.strip() == "error: unknown ffn kind 'nonexistent'; allowed: " + out.stderr.split("allowed: ")[1].strip()
    assert "Traceback" not in out.stderr and not (tmp_path / "new").exists()


def test_other_bad_commands(tmp_path, capsys):
    assert main(["eval", "--workdir", str(tmp_path)]) == 2
    assert "is not a workdir" in capsys.readouterr().err
    assert main(["sweep", "no_such_experiment", "--scale", "smoke"]) == 2
    assert "unknown experiment 'no_such_experiment'; allowed:" in capsys.readouterr().err
    broken = tmp_path / "broken.py"
    broken.write_text("def cells(scale):\n    return {'a': ['model.ffn=nope']}\n")
    assert main(["sweep", str(broken), "--scale", "smoke", "--runs-dir", str(tmp_path / "runs")]) == 2
    assert "cell 'a': unknown ffn kind 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_list(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "ffn: dense" in out and "mixer: attention" in out and "quickstart" in out and "mqar" in out
