"""Plugins from outside the repository, written from the README alone: listed, contract-tested,
trained, counted by their reported activation ratio; a broken plugin or built-in module is one line."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_plugin(directory: Path) -> Path:
    """The README's 'Add a new variant' code blocks, concatenated into one plugin file."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Add a new variant"):]
    section = section[: section.index("\n## ", 3)]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 2, "the section shows an FFN and a mixer"
    path = directory / "my_variants.py"
    path.write_text("\n".join(blocks))
    return path


def cli(*args, env_plugins: str = "", cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "CFM_JAX_PLUGINS": env_plugins}
    return subprocess.run([sys.executable, "-m", "cfm_jax.cli", *args], capture_output=True, text=True,
                          env=env, cwd=cwd or ROOT, timeout=600)


def test_readme_plugin_lists_trains_and_is_counted_by_its_activation_ratio(tmp_path):
    plugin = readme_plugin(tmp_path)
    listed = cli("--plugin", str(plugin), "list")
    assert listed.returncode == 0 and "my_ffn" in listed.stdout and "my_mixer" in listed.stdout, listed.stderr
    fields = cli("--plugin", str(plugin), "list", "my_ffn")
    assert "d_ff: int = 256  # hidden width" in fields.stdout
    workdir = tmp_path / "run"
    common = ["--workdir", str(workdir)]
    trained = cli("--plugin", str(plugin), "train", *common, "--scale", "smoke", "--no-progress", "model.ffn=my_ffn",
                  "model.mixer=my_mixer", "model.ffn.d_ff=128", "train.steps=3", "data.seq_len=32")
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert cli("eval", *common, env_plugins=str(plugin)).returncode == 0  # the same plugin through the env
    result = json.loads((workdir / "eval.json").read_text())
    d, f = 64, 128
    ratios = [result["stats"][f"ffn/activation_ratio/layer{i}"] for i in range(2)]
    assert 0 < min(ratios) and max(ratios) < 1
    assert result["ffn_params_active_per_token"] == sum(d * f + round(d * f * r) for r in ratios)
    without = cli("eval", *common)  # the kinds are unknown without the plugin: one line, exit 2
    assert without.returncode == 2 and "unknown" in without.stderr and "Traceback" not in without.stderr


@pytest.mark.slow  # default tier kept near 10 min on 2 cores; `make test-slow` runs it
def test_readme_plugin_passes_the_contract_tests(tmp_path):
    plugin = readme_plugin(tmp_path)
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-o", "addopts=", "-p", "no:cacheprovider", "tests/test_contract.py",
                          "-k", "my_ffn or my_mixer"], capture_output=True, text=True, cwd=ROOT, timeout=900,
                         env={**os.environ, "CFM_JAX_PLUGINS": str(plugin)})
    assert run.returncode == 0, run.stdout[-3000:]
    assert re.search(r"(\d+) passed", run.stdout) and int(re.search(r"(\d+) passed", run.stdout).group(1)) >= 10


def test_broken_plugin_is_one_line_exit_2_and_broken_builtin_keeps_the_rest(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def oops(:\n")
    run = cli("--plugin", str(bad), "list")
    assert run.returncode == 2 and run.stderr.count("\n") == 1, run.stderr
    assert f"plugin '{bad}' failed to import (SyntaxError" in run.stderr
    missing = cli("list", env_plugins="no_such_module_xyz")
    assert missing.returncode == 2 and "ModuleNotFoundError" in missing.stderr
    # A broken module inside a built-in plugin package: a warning, and every other kind still works.
    package = tmp_path / "pkg_with_broken"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "broken.py").write_text("import no_such_module_xyz\n")
    script = ("import sys; sys.path.insert(0, %r); from cfm_jax import registry; "
              "registry._PLUGIN_PACKAGES = (*registry._PLUGIN_PACKAGES, 'pkg_with_broken'); "
              "print(registry.kinds('mixer')); registry.get('mixer', 'nope')") % str(tmp_path)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert "warning: pkg_with_broken/broken.py failed to import (ModuleNotFoundError" in run.stderr
    assert "'attention'" in run.stdout
    assert "pkg_with_broken/broken.py failed to import" in run.stderr.splitlines()[-1]  # named in the unknown-kind error


def test_dry_run_and_config_relaunch(tmp_path):
    dry = cli("train", "--workdir", str(tmp_path / "never"), "--scale", "smoke", "model.ffn=moe", "--dry-run")
    assert dry.returncode == 0 and not (tmp_path / "never").exists()
    cfg = json.loads(dry.stdout)
    assert cfg["model"]["ffn"]["kind"] == "moe" and cfg["model"]["d_model"] == 64
    (tmp_path / "config.json").write_text(json.dumps({"config": cfg, "provenance": {}}))
    again = cli("train", "--workdir", str(tmp_path / "w"), "--config", str(tmp_path / "config.json"),
                "train.steps=7", "--dry-run")
    relaunched = json.loads(again.stdout)
    assert relaunched["train"]["steps"] == 7 and {**relaunched, "train": cfg["train"]} == cfg
    (tmp_path / "bad.json").write_text("[1, 2]")
    bad = cli("train", "--workdir", str(tmp_path / "w"), "--config", str(tmp_path / "bad.json"), "--dry-run")
    assert bad.returncode == 2 and "holds no config object" in bad.stderr


def test_plugin_task_registers_like_a_kind(tmp_path):
    """A Task subclass with a name, in a plugin, becomes data.task=NAME (no list to edit)."""
    plugin = tmp_path / "my_task.py"
    plugin.write_text('''
import numpy as np
from cfm_jax.data.base import Task

class Constant(Task):
    """Every token 7, every next token scored."""
    name = "constant7"
    vocab_size = 16

    def train_batch(self, seed, step, batch_size):
        x = np.full((batch_size, self.cfg.seq_len), 7, np.int32)
        return {"inputs": x, "labels": x}

    def eval_sets(self, batch_size):
        return {"val": [self.train_batch(0, 0, batch_size)]}
''')
    listed = cli("--plugin", str(plugin), "list")
    assert "constant7" in listed.stdout.splitlines()[2], listed.stdout
    dry = cli("--plugin", str(plugin), "train", "--workdir", str(tmp_path / "w"), "--scale", "smoke",
              "data.task=constant7", "--dry-run")
    assert dry.returncode == 0 and json.loads(dry.stdout)["data"]["task"] == "constant7"


@pytest.mark.slow  # default tier kept near 10 min on 2 cores; `make test-slow` runs it
def test_plugin_kind_in_a_parallel_sweep(tmp_path):
    """Sweep workers (separate processes) load the plugin before they unpickle a config using it."""
    plugin = readme_plugin(tmp_path)
    (tmp_path / "exp.py").write_text(
        'SEEDS = 2\ndef cells(scale):\n    return {"mine": ["model.ffn=my_ffn", "model.mixer=my_mixer", "model.d_model=32", '
        '"data.seq_len=32", "train.steps=3", "data.eval_batches=1"]}\n')
    run = cli("--plugin", str(plugin), "sweep", str(tmp_path / "exp.py"), "--scale", "smoke", "--workers", "2",
              "--runs-dir", str(tmp_path / "runs"), "--no-progress")
    assert run.returncode == 0, run.stderr[-2000:]
    assert all((tmp_path / "runs" / "exp" / "smoke" / f"mine.s{i}" / "eval.json").exists() for i in range(2))


def test_a_task_in_one_file_registers_with_its_own_config(tmp_path):
    """docs/CONFIGURATION.md's task example as a plugin: listed with its field, trained with a flat
    data.FIELD override given before data.task (another task's field: tests/test_config.py)."""
    text = (ROOT / "docs" / "CONFIGURATION.md").read_text()
    section = text[text.index("### Add a task"):]
    plugin = tmp_path / "my_task.py"
    plugin.write_text(re.findall(r"```python\n(.*?)```", section, re.S)[0])
    listed = cli("--plugin", str(plugin), "list", "repeat")
    assert listed.returncode == 0 and "period: int = 4  # the sequence repeats" in listed.stdout, listed.stderr
    assert "task: str = 'repeat'" in listed.stdout
    workdir = tmp_path / "run"
    trained = cli("--plugin", str(plugin), "train", "--workdir", str(workdir), "--scale", "smoke", "--no-progress",
                  "data.period=8", "data.task=repeat", "data.vocab_size=32", "data.seq_len=32", "train.steps=3",
                  "model.d_model=32")
    assert trained.returncode == 0, trained.stderr[-2000:]
    config = json.loads((workdir / "config.json").read_text())["config"]["data"]
    assert config["task"] == "repeat" and config["period"] == 8 and "num_kv_pairs" not in config
