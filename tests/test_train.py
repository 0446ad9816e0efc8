"""Training: resume equals uninterrupted, raising steps continues, non-finite loss stops cleanly."""

from __future__ import annotations

import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cfm_jax import workdir as wd
from cfm_jax.config import resolve
from cfm_jax.errors import TrainingDiverged, UserError
from cfm_jax.train import restore_model, train

TINY = ["model.d_model=32", "data.seq_len=32", "train.batch_size=4", "train.log_every=1", "train.checkpoint_every=5"]


def losses(workdir):
    return {r["step"]: r["loss"] for r in wd.read_metrics(workdir)}


def test_resumed_run_reproduces_uninterrupted_losses(tmp_path):
    cfg = resolve("smoke", [*TINY, "train.steps=20"])
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    train(cfg, full, progress=False)
    # Simulate a crash right after the step-10 checkpoint: the later checkpoints never happened,
    # but metrics.jsonl still holds rows past step 10 (written before the crash).
    shutil.copytree(full, crashed)
    for step_dir in (crashed / "checkpoints").iterdir():
        if step_dir.name.isdigit() and int(step_dir.name) > 10:
            shutil.rmtree(step_dir)
    train(cfg, crashed, progress=False)
    steps = [r["step"] for r in wd.read_metrics(crashed)]
    assert steps == list(range(1, 21)), "every step exactly once"
    assert losses(crashed) == losses(full)  # bit-identical on the same machine


def test_raising_steps_continues_without_duplicates(tmp_path):
    train(resolve("smoke", [*TINY, "train.steps=10"]), tmp_path, progress=False)
    first = losses(tmp_path)
    last = train(resolve("smoke", [*TINY, "train.steps=15"]), tmp_path, progress=False)
    steps = [r["step"] for r in wd.read_metrics(tmp_path)]
    assert steps == list(range(1, 16)) and last["step"] == 15
    assert all(losses(tmp_path)[s] == first[s] for s in first)
    assert last["tokens"] == 15 * 4 * 32
    # Same command again: nothing to do, nothing duplicated.
    train(resolve("smoke", [*TINY, "train.steps=15"]), tmp_path, progress=False)
    assert [r["step"] for r in wd.read_metrics(tmp_path)] == steps


def test_incompatible_config_is_refused_before_touching_the_workdir(tmp_path):
    train(resolve("smoke", [*TINY, "train.steps=5"]), tmp_path, progress=False)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    with pytest.raises(UserError, match="holds a different config"):
        train(resolve("smoke", [*TINY, "train.steps=5", "model.d_model=64"]), tmp_path, progress=False)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    # A huge learning rate makes the loss blow up within a few steps.
    cfg = resolve("smoke", [*TINY, "train.steps=50", "train.lr=1e30", "train.warmup_steps=0",
                            "train.grad_clip=0", "train.checkpoint_every=1"])
    with pytest.raises(TrainingDiverged, match="non-finite .* at step (\\d+).*last good checkpoint: step") as info:
        train(cfg, tmp_path, progress=False)
    bad_step = int(re.search(r"at step (\d+)", info.value.args[0]).group(1))
    kept = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert kept and max(kept) == bad_step - 1
    assert all(r["step"] < bad_step for r in wd.read_metrics(tmp_path))


def test_skip_nonfinite_keeps_training(tmp_path):
    """With train.skip_nonfinite the bad steps are not applied: parameters stay finite and the run ends."""
    cfg = resolve("smoke", [*TINY, "train.steps=12", "train.lr=1e30", "train.warmup_steps=0", "train.grad_clip=0",
                            "train.skip_nonfinite=true"])
    last = train(cfg, tmp_path, progress=False)
    assert last["step"] == 12 and last["skipped_steps"] >= 1
    model, step = restore_model(tmp_path, cfg, 256)
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert step == 12 and all(bool(np.all(np.isfinite(x))) for x in leaves)


def test_same_seed_same_metrics(tmp_path):
    cfg = resolve("smoke", [*TINY, "train.steps=6"])
    train(cfg, tmp_path / "a", progress=False)
    train(cfg, tmp_path / "b", progress=False)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
    assert strip(wd.read_metrics(tmp_path / "a")) == strip(wd.read_metrics(tmp_path / "b"))
    other = resolve("smoke", [*TINY, "train.steps=6", "train.seed=1"])
    train(other, tmp_path / "c", progress=False)
    assert strip(wd.read_metrics(tmp_path / "c")) != strip(wd.read_metrics(tmp_path / "a"))


def test_reconfigure_continues_a_checkpoint_under_a_new_config(tmp_path):
    train(resolve("smoke", [*TINY, "train.steps=5"]), tmp_path, progress=False)
    changed = resolve("smoke", [*TINY, "train.steps=8", "train.lr=5e-4"])
    with pytest.raises(UserError, match="holds a different config"):
        train(changed, tmp_path, progress=False)
    last = train(changed, tmp_path, progress=False, reconfigure=True)
    assert last["step"] == 8 and wd.load_config(tmp_path).train.lr == 5e-4
    wider = resolve("smoke", [*TINY, "train.steps=9", "model.d_model=64"])
    with pytest.raises(UserError, match="is intact but was saved by a model of other shapes"):  # refused, nothing lost
        train(wider, tmp_path, progress=False, reconfigure=True)
    assert wd.load_config(tmp_path).model.d_model == 32


def test_validation_during_training_is_logged_apart_and_changes_nothing(tmp_path):
    """train.eval_every=N adds "eval/SET/..." values every N steps (and at the end) to that step's row,
    one row per step, and the training losses are bit-identical to a run without it."""
    base = ["model.d_model=32", "data.seq_len=32", "train.batch_size=4", "train.log_every=2", "train.steps=7",
            "data.task=mqar", "data.vocab_size=64", "data.num_kv_pairs=2", "data.eval_batches=1"]
    train(resolve("smoke", base), tmp_path / "plain", progress=False)
    train(resolve("smoke", [*base, "train.eval_every=3"]), tmp_path / "val", progress=False)
    rows = wd.read_metrics(tmp_path / "val")
    assert [r["step"] for r in rows] == [2, 3, 4, 6, 7]  # logged every 2, evaluated at 3, 6 and the end
    evaluated = [r["step"] for r in rows if "eval/len32/loss" in r]
    assert evaluated == [3, 6, 7]
    assert all(0 <= r["eval/len32/accuracy"] <= 1 and r["eval/len32/loss"] > 0 for r in rows if r["step"] in evaluated)
    plain = losses(tmp_path / "plain")
    assert all(plain[r["step"]] == r["loss"] for r in rows if r["step"] in plain)


def test_config_and_eval_record_provenance(tmp_path):
    from cfm_jax.harness.evaluate import evaluate

    train(resolve("smoke", [*TINY, "train.steps=2", "data.eval_batches=1"]), tmp_path, progress=False)
    evaluate(tmp_path)
    for name in (wd.CONFIG, wd.EVAL):
        prov = __import__("json").loads((tmp_path / name).read_text())["provenance"]
        assert set(prov["versions"]) == {"jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy"}
        assert prov["backend"] == "cpu" and prov["time"].endswith("Z")
        assert {"commit", "dirty"} <= set(prov["git"]) and "CFM_JAX_MATMUL" in prov["kernels"]
        assert {"mkl", "mkl_under_auto", "flash_attention", "selective_scan", "XLA_FLAGS"} <= set(prov["kernels"])


def test_second_writer_on_a_workdir_is_refused(tmp_path):
    """While one process holds the workdir's lock, train refuses with one line and touches nothing."""
    cfg = resolve("smoke", [*TINY, "train.steps=2"])
    with wd.locked(tmp_path):
        with pytest.raises(UserError, match="is in use by another process"):
            train(cfg, tmp_path, progress=False)
        assert not (tmp_path / wd.METRICS).exists() and not (tmp_path / wd.CONFIG).exists()
    assert train(cfg, tmp_path, progress=False)["step"] == 2  # released: trains


def test_torn_metrics_line_keeps_the_rows_after_it(tmp_path, capsys):
    cfg = resolve("smoke", [*TINY, "train.steps=6"])
    train(cfg, tmp_path, progress=False)
    path = tmp_path / wd.METRICS
    lines = path.read_text().splitlines()
    path.write_text("\n".join([*lines[:2], lines[2][:15], *lines[3:]]) + "\n")  # row 3 cut mid-line
    rows = wd.read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 4, 5, 6]
    assert "skipped 1 unreadable line(s) (first: line 3)" in capsys.readouterr().err
    train(resolve("smoke", [*TINY, "train.steps=8"]), tmp_path, progress=False)  # resume keeps them
    assert [r["step"] for r in wd.read_metrics(tmp_path)] == [1, 2, 4, 5, 6, 7, 8]


def test_non_finite_parameters_stop_before_any_checkpoint(tmp_path):
    """An update that makes parameters non-finite (lr 1e39 overflows float32) while loss and gradient
    are finite: the run stops at that step and no checkpoint holds the bad parameters."""
    cfg = resolve("smoke", [*TINY, "train.steps=6", "train.lr=1e39", "train.warmup_steps=0"])
    with pytest.raises(TrainingDiverged, match="non-finite parameters after the update at step 1"):
        train(cfg, tmp_path / "a", progress=False)
    assert not (tmp_path / "a" / wd.CHECKPOINTS).exists() or not any((tmp_path / "a" / wd.CHECKPOINTS).iterdir())


def test_skip_nonfinite_stops_after_consecutive_skips(tmp_path):
    cfg = resolve("smoke", [*TINY, "train.steps=20", "train.lr=1e39", "train.warmup_steps=0",
                            "train.skip_nonfinite=true", "train.max_consecutive_skips=3"])
    with pytest.raises(TrainingDiverged, match=r"3 non-finite steps in a row up to step 3 \(train.max_consecutive_skips=3\)"):
        train(cfg, tmp_path, progress=False)


@pytest.mark.parametrize("override, fragment", [
    ("train.lr=nan", "train.lr='nan' is not a finite number"), ("train.lr=1e400", "is not a finite number"),
    ("model.init_std=inf", "is not a finite number"), ("train.grad_clip=nan", "is not a finite number"),
    ("train.seed=-1", "train.seed=-1 must be in [0, 2**32)"), ("train.seed=4294967296", "must be in [0, 2**32)"),
    ("model.layers=gla*²", "bad repeat count"),
])
def test_non_finite_and_out_of_range_values_are_refused(override, fragment):
    with pytest.raises(UserError, match=re.escape(fragment)):
        resolve("smoke", [override])


def test_corrupted_checkpoint_is_found_and_restore_falls_back(tmp_path, capsys):
    """A byte flipped anywhere in the newest step's largest data file never restores silently changed
    parameters: restoring that step is refused (and restore_latest falls back to the step before,
    saying so), or, where the byte is one the checkpoint does not use, the arrays come back exactly
    as saved. A step whose data no longer match the digest saved with it is refused."""
    from cfm_jax.checkpoint import DIGESTS, Checkpoints, digest
    from cfm_jax.train import init_state

    cfg = resolve("smoke", [*TINY, "train.steps=10"])
    train(cfg, tmp_path / "run", progress=False)
    _, like, _, _ = init_state(cfg, 256)
    root = tmp_path / "run" / wd.CHECKPOINTS
    saved = __import__("json").loads((root / DIGESTS).read_text())
    assert set(saved) == {"5", "10"}  # one per kept step
    biggest = max((p for p in (root / "10").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    clean = biggest.read_bytes()
    refused = 0
    for fraction in (0.1, 0.3, 0.5, 0.7, 0.9, 0.99):
        data = bytearray(clean)
        data[int(len(data) * fraction)] ^= 0x10
        biggest.write_bytes(bytes(data))
        ckpt = Checkpoints(root, 3)
        try:
            try:
                state = ckpt.restore(10, like)
            except UserError as e:
                assert "checkpoint step 10" in str(e) and "cannot be restored" in str(e)
                refused += 1
                step, _ = ckpt.restore_latest(like)
                assert step == 5 and "falling back to step 5" in capsys.readouterr().err
                rejected = next(p for p in root.iterdir() if p.name.startswith("rejected-10-"))
                rejected.rename(root / "10")  # moved aside by the fallback; back for the next flip
            else:
                assert digest(state) == saved["10"]  # an unused byte: nothing changed
        finally:
            ckpt.close()
    assert refused >= 3
    biggest.write_bytes(clean)
    (root / DIGESTS).write_text(__import__("json").dumps({**saved, "10": "0" * 64}))
    ckpt = Checkpoints(root, 3)
    try:
        with pytest.raises(UserError, match="does not match the digest saved with it"):
            ckpt.restore(10, like)
    finally:
        ckpt.close()


def test_written_files_follow_the_umask_not_0600(tmp_path):
    wd.write_json(tmp_path / "x.json", {"a": 1})
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "x.json").stat().st_mode & 0o777 == 0o666 & ~mask


def test_resume_falls_back_past_an_empty_newest_step_directory(tmp_path, capsys):
    """A step directory left empty (a crash before orbax wrote anything, or a user's mkdir): train
    warns, resumes from the newest intact step and finishes."""
    cfg = resolve("smoke", [*TINY, "train.steps=10"])
    train(cfg, tmp_path, progress=False)
    (tmp_path / wd.CHECKPOINTS / "20").mkdir()
    last = train(resolve("smoke", [*TINY, "train.steps=12"]), tmp_path, progress=False)
    assert last["step"] == 12 and "step 20" in capsys.readouterr().err
    assert losses(tmp_path)[12] == last["loss"]
    # The rejected step was moved aside (kept for inspection), so training can save step 20 again.
    assert any(p.name.startswith("rejected-20-") for p in (tmp_path / wd.CHECKPOINTS).iterdir())
    assert train(resolve("smoke", [*TINY, "train.steps=20"]), tmp_path, progress=False)["step"] == 20


def test_a_failed_save_is_not_masked_by_tensorboard_failing_to_flush_onto_the_full_disk(tmp_path, monkeypatch):
    """The save fails on a full disk; closing TensorBoard then fails too (its buffered events meet the
    same full disk: how the slow tmpfs test below once failed under load). The save's error is the one
    raised; with no error on its way, a failure in closing is raised."""
    import errno

    from cfm_jax.checkpoint import Checkpoints
    from cfm_jax.tracking import Trackers

    def full(*_):
        raise OSError(errno.ENOSPC, "No space left on device")

    def save(self, step, state):
        raise OSError(errno.ENOSPC, f"no space left on device while saving checkpoint step {step}", "ckpts")

    monkeypatch.setattr(Trackers, "close", lambda self: full())
    monkeypatch.setattr(Checkpoints, "save", save)
    with pytest.raises(OSError, match="while saving checkpoint step 3"):
        train(resolve("smoke", [*TINY, "train.steps=3"]), tmp_path / "a", progress=False)
    monkeypatch.undo()
    monkeypatch.setattr(Trackers, "close", lambda self: full())
    with pytest.raises(OSError, match="No space left on device"):
        train(resolve("smoke", [*TINY, "train.steps=3"]), tmp_path / "b", progress=False)


@pytest.mark.slow  # default tier kept near 10 min on 2 cores; `make test-slow` runs it
def test_disk_full_during_a_save_is_one_error_line_and_exit_1(tmp_path):
    """A 256 kB tmpfs fills up during the first checkpoint save: the run ends with exit 1 and one
    `error:` line saying so; what orbax's writer threads print goes to a discarded temporary file."""
    import subprocess
    import sys

    tiny = tmp_path / "tiny"
    tiny.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(tiny)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        out = subprocess.run([sys.executable, "-m", "cfm_jax.cli", "train", "--workdir", str(tiny / "run"), "--scale",
                              "smoke", "--no-progress", *TINY, "train.steps=4"], capture_output=True, text=True, timeout=300)
    finally:
        subprocess.run(["umount", str(tiny)], capture_output=True)
    assert out.returncode == 1, out.stderr[-2000:]
    assert out.stderr.count("\n") == 1, out.stderr[-3000:]  # orbax's own tracebacks do not reach the user
    assert out.stderr.startswith("error: no space left on device while saving checkpoint step 4")
    assert "the last complete checkpoint is kept, rerun to resume once there is space" in out.stderr


def test_progress_without_a_terminal_is_plain_lines(tmp_path, capsys):
    """stderr is not a terminal under pytest: progress is whole lines (no carriage returns), one at the
    end at least, each naming the step, the total and the loss."""
    from cfm_jax.progress import PlainProgress, progress_bar

    bar = progress_bar(10, 0, "run", enabled=True)
    assert isinstance(bar, PlainProgress)
    bar.interval = 0.0  # a line per update
    for _ in range(3):
        bar.update(1)
        bar.set_postfix(loss="1.2345")
    bar.close()
    err = capsys.readouterr().err
    assert "\r" not in err and err.count("\n") == 4
    assert err.splitlines()[-1].startswith("run: step 3/10 (30 %), loss=1.2345, ")
    train(resolve("smoke", ["train.steps=4", "model.d_model=32", "data.seq_len=32"]), tmp_path / "w", progress=True)
    err = capsys.readouterr().err
    assert "\r" not in err and "w: step 4/4 (100 %), loss=" in err


def test_tensorboard_event_files_hold_the_logged_scalars(tmp_path):
    """Every run writes TensorBoard events beside metrics.jsonl: train loss, lr, tokens/s, the FFN
    statistics and the validation metrics, at the logged steps, equal to the jsonl rows; the config
    as text. train.tensorboard=false writes none."""
    from cfm_jax.tracking import TENSORBOARD, read_events

    w = tmp_path / "w"
    train(resolve("smoke", ["train.steps=6", "train.log_every=2", "train.eval_every=3", "model.d_model=32",
                            "data.seq_len=32", "model.ffn=neuron_sparse"]), w, progress=False)
    scalars, texts = read_events(w / TENSORBOARD)
    rows = wd.read_metrics(w)
    assert [s for s, _ in scalars["train/loss"]] == [r["step"] for r in rows] == [2, 3, 4, 6]
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([r["loss"] for r in rows])
    assert {"train/lr", "train/tokens_per_s", "ffn/activation_ratio", "eval/val/loss"} <= set(scalars)
    assert [s for s, _ in scalars["eval/val/loss"]] == [3, 6]
    assert '"d_model": 32' in texts["config"]
    train(resolve("smoke", ["train.steps=2", "model.d_model=32", "data.seq_len=32", "train.tensorboard=false"]),
          tmp_path / "off", progress=False)
    assert not (tmp_path / "off" / TENSORBOARD).exists()


def test_wandb_project_without_the_package_warns_and_trains(tmp_path, capsys):
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed: test_wandb_offline covers it")
    train(resolve("smoke", ["train.steps=2", "model.d_model=32", "data.seq_len=32", "train.wandb=cfm"]), tmp_path / "w",
          progress=False)
    assert "train.wandb='cfm' but the wandb package is not installed" in capsys.readouterr().err
    assert wd.read_metrics(tmp_path / "w")[-1]["step"] == 2


def test_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    train(resolve("smoke", ["train.steps=2", "model.d_model=32", "data.seq_len=32", "train.wandb=cfm"]), tmp_path / "w",
          progress=False)
    assert list((tmp_path / "w" / "wandb").glob("offline-run-*"))


def test_head_at_scored_positions_only_gives_the_full_loss_and_gradients():
    """MQAR batches carry their scored positions; the loss computed with the output head only there
    equals the loss over full logits masked by the labels, and so do the gradients."""
    from cfm_jax.data import make_task
    from cfm_jax.train import cross_entropy, init_state

    cfg = resolve("smoke", ["data.task=mqar", "data.vocab_size=512", "data.seq_len=32", "data.num_kv_pairs=4",
                            "model.d_model=32"])
    task = make_task(cfg.data)
    batch = task.train_batch(0, 0, 4)
    assert batch["positions"].shape == (4, 4)
    np.testing.assert_array_equal(np.sort(np.flatnonzero(batch["labels"][0] != -1)), batch["positions"][0])
    graphdef, state, _, _ = init_state(cfg, task.vocab_size)

    def loss(params, scored):
        model = nnx.merge(graphdef, params, state["rest"])
        positions = jnp.asarray(batch["positions"]) if scored else None
        logits, _ = model(jnp.asarray(batch["inputs"]), positions=positions)
        labels = jnp.asarray(batch["labels"])
        if scored:
            labels = jnp.take_along_axis(labels, positions, axis=1)
        ce, _, n = cross_entropy(logits, labels)
        return ce / n

    full, g_full = jax.value_and_grad(loss)(state["params"], False)
    part, g_part = jax.value_and_grad(loss)(state["params"], True)
    assert float(part) == pytest.approx(float(full), rel=1e-6)
    for a, b in zip(jax.tree.leaves(g_part), jax.tree.leaves(g_full)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("counts", ["data.num_kv_pairs=4", "data.train_kv_pairs=2,4,8"])
def test_train_step_with_scored_positions_equals_the_full_head_step(counts):
    """Through make_train_step itself: an MQAR batch with its positions and the same batch without
    them give the same loss and the same updated parameters (also with a pair-count mixture, whose
    short rows pad their positions with an unscored one)."""
    from cfm_jax.data import make_task
    from cfm_jax.train import init_state, make_train_step

    cfg = resolve("smoke", ["data.task=mqar", "data.vocab_size=512", "data.seq_len=32", counts, "model.d_model=32"])
    task = make_task(cfg.data)
    batch = task.train_batch(0, 0, 4)
    graphdef, state, tx, _ = init_state(cfg, task.vocab_size)
    step = make_train_step(graphdef, tx)
    outs = [step(state["params"], state["rest"], state["opt_state"], b, 0)
            for b in (batch, {k: v for k, v in batch.items() if k != "positions"})]
    assert float(outs[0][3]["ce"]) == pytest.approx(float(outs[1][3]["ce"]), rel=1e-6)
    for a, b in zip(jax.tree.leaves(outs[0][0]), jax.tree.leaves(outs[1][0])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_evaluation_with_scored_positions_equals_the_full_head():
    """MQAR eval batches carry their answer positions too: evaluating with the head only there gives
    the same accuracy, sequence accuracy and loss as the full head (also per pair count)."""
    from cfm_jax.data import make_task
    from cfm_jax.harness.evaluate import evaluate_sets
    from cfm_jax.train import init_state

    cfg = resolve("smoke", ["data.task=mqar", "data.vocab_size=512", "data.seq_len=32", "data.train_kv_pairs=2,8",
                            "data.eval_kv_pairs=2,8", "data.eval_lengths=32", "data.eval_batches=2", "model.d_model=32"])
    task = make_task(cfg.data)
    graphdef, state, _, _ = init_state(cfg, task.vocab_size)
    model = nnx.merge(graphdef, state["params"], state["rest"])
    sets = task.eval_sets(4)
    assert all(b["positions"].shape == (4, kv) for kv in (2, 8) for b in sets[f"len32kv{kv}"])
    full = {name: [{k: v for k, v in b.items() if k != "positions"} for b in batches] for name, batches in sets.items()}
    scored, _ = evaluate_sets(model, task, sets)
    everything, _ = evaluate_sets(model, task, full)
    for name in sets:
        assert scored[name]["accuracy"] == everything[name]["accuracy"]
        assert scored[name]["sequence_accuracy"] == everything[name]["sequence_accuracy"]
        assert scored[name]["tokens"] == everything[name]["tokens"] == 4 * 2 * int(name.split("kv")[1])
        assert scored[name]["loss"] == pytest.approx(everything[name]["loss"], rel=1e-5)
