"""Seed statistics and declared comparisons: known answers for the intervals and tests, and a table
built from synthetic per-seed numbers (a real difference, no difference, a bimodal cell) whose
comparisons and wording are checked."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from cfm_jax import workdir as wd
from cfm_jax.config import resolve
from cfm_jax.harness import stats
from cfm_jax.harness.experiments import load_experiment
from cfm_jax.harness.report import covered_seconds, report
from cfm_jax.harness.sweep import cell_workdir


def test_t_interval_known_answer():
    lo, hi = stats.t_interval([1.0, 2.0, 3.0])
    half = 4.302652729911275 / math.sqrt(3)  # t(0.975, 2) * sd 1 / sqrt(3)
    assert lo == pytest.approx(2 - half) and hi == pytest.approx(2 + half)
    assert all(math.isnan(v) for v in stats.t_interval([1.0]))


def test_summary_counts_solved_seeds_and_median():
    s = stats.summarize([0.51, 0.53, 0.99], solved_at=0.9)
    assert s["n"] == 3 and s["solved"] == 1 and s["median"] == 0.53
    assert s["mean"] == pytest.approx((0.51 + 0.53 + 0.99) / 3)
    assert stats.is_bimodal([0.51, 0.53, 0.99], 0.9) and not stats.is_bimodal([0.95, 0.99], 0.9)


def test_sign_flip_is_exact():
    assert stats.sign_flip_p([1.0, 1.0, 1.0]) == pytest.approx(2 / 8)  # all-positive or all-negative
    assert stats.sign_flip_p([1.0, 2.0, 3.0, 4.0, 5.0]) == pytest.approx(2 / 32)
    assert stats.sign_flip_p([1.0, -1.0, 1.0, -1.0]) == 1.0


def test_paired_t_matches_scipy_and_handles_constant_differences():
    from scipy import stats as sp

    a, b = [1.0, 1.2, 0.9, 1.1, 1.05], [0.8, 1.1, 0.85, 0.9, 1.0]
    got = stats.compare(a, b)
    assert got["test"] == "paired t" and got["p"] == pytest.approx(sp.ttest_rel(a, b).pvalue)
    assert got["diff"] == pytest.approx(np.mean(np.subtract(a, b)))
    assert stats.paired_t_p([0.1, 0.1, 0.1]) == 0.0 and stats.paired_t_p([0.0, 0.0]) == 1.0


def test_non_finite_values_give_no_p_value():
    """A NaN seed must not read as a significant difference (the exact test once returned p = 0)."""
    assert math.isnan(stats.compare([math.nan, 0.95, 0.2], [0.1, 0.1, 0.1], bimodal=True)["p"])
    assert math.isnan(stats.compare([math.nan, 0.95, 0.2], [0.1, 0.1, 0.1])["p"])


def test_record_matching_requires_the_same_step_count_and_export_leaves_no_stale_result(tmp_path):
    from cfm_jax.harness import records

    cfg = resolve("smoke", ["model.d_model=32", "train.steps=6"])
    run = tmp_path / "run"
    run.mkdir()
    wd.save_config(run, cfg)
    config_json = __import__("json").loads((run / wd.CONFIG).read_text())
    assert records.config_matches(config_json, cfg)
    assert records.config_matches(config_json, resolve("smoke", ["model.d_model=32", "train.steps=6", "train.log_every=3"]))
    assert not records.config_matches(config_json, resolve("smoke", ["model.d_model=32", "train.steps=12"]))
    dest = tmp_path / "record"
    dest.mkdir()
    (dest / wd.EVAL).write_text('{"metrics": {"val/loss": 1.0}}')  # an earlier config's result
    wd.write_json(run / wd.DIVERGED, {"error": "non-finite loss"})
    records.export(run, dest)
    assert not (dest / wd.EVAL).exists() and (dest / wd.DIVERGED).exists()
    assert not records.finished(dest, cfg) and records.diverged(dest, cfg)


def test_cells_named_like_lr_runs_stay_apart_without_a_grid(tmp_path):
    from cfm_jax.harness.report import collect_runs

    path = tmp_path / "lrnames.py"
    path.write_text("SEEDS = 2\ndef cells(scale):\n    return {'attn.lr1e-3': ['train.lr=1e-3'], 'attn.lr3e-3': ['train.lr=3e-3']}\n")
    rows = collect_runs(load_experiment(str(path)), "smoke", tmp_path / "runs", tmp_path / "results")
    assert [r["base"] for r in rows] == ["attn.lr1e-3"] * 2 + ["attn.lr3e-3"] * 2


def test_holm_known_answer():
    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    out = stats.holm([0.2, math.nan])
    assert out[0] == pytest.approx(0.2) and math.isnan(out[1])


def test_comparison_rejects_unknown_direction():
    with pytest.raises(ValueError, match="expect='bigger'"):
        stats.Comparison("a", "b", "val/loss", "bigger")


EXPERIMENT = '''"""Synthetic: four cells whose per-seed numbers are written by the test."""
from cfm_jax.harness.stats import Comparison

SEEDS = 5
SOLVED = 0.9
COLUMNS = ["val/loss", "len32/accuracy"]
COMPARISONS = [
    Comparison("good", "bad", "val/loss", "less", "good has lower loss than bad"),
    Comparison("good", "same", "val/loss", "less", "good has lower loss than same"),
    Comparison("att", "rec", "len32/accuracy", "greater", "attention recalls better"),
]


def cells(scale):
    base = ["model.d_model=32", "data.seq_len=32", "train.batch_size=4", "train.steps=6", "data.eval_batches=1"]
    return {name: base + [f"train.lr={lr}"] for name, lr in
            (("good", 1e-3), ("bad", 2e-3), ("same", 3e-3), ("att", 4e-3), ("rec", 5e-3))}


def reading(table, tests):
    return "\\n".join("- " + t["text"] for t in tests)
'''

VALUES = {  # cell -> per-seed (val/loss, len32/accuracy)
    "good": ([1.00, 1.01, 0.99, 1.02, 1.00], [0.5] * 5),
    "bad": ([1.10, 1.12, 1.08, 1.11, 1.10], [0.5] * 5),  # +0.1 in every seed: a real difference
    "same": ([1.01, 1.00, 1.01, 1.01, 0.99], [0.5] * 5),  # differences -0.01..+0.01: none
    "att": ([1.0] * 5, [1.0, 1.0, 0.99, 1.0, 1.0]),
    "rec": ([1.0] * 5, [0.30, 0.98, 0.31, 0.97, 0.30]),  # bimodal: 2 of 5 seeds solve it
}


def _write_runs(tmp_path, text=EXPERIMENT):
    """Finished workdirs with synthetic eval.json (and a metrics.jsonl with a validation row)."""
    path = tmp_path / "synthetic.py"
    path.write_text(text)
    experiment = load_experiment(str(path))
    runs = tmp_path / "runs"
    for name, overrides in experiment.cells("smoke").items():
        base, seed = name.rsplit(".s", 1)
        workdir = cell_workdir(runs, "synthetic", "smoke", name)
        workdir.mkdir(parents=True)
        wd.save_config(workdir, resolve("smoke", overrides))
        loss, acc = VALUES[base][0][int(seed)], VALUES[base][1][int(seed)]
        wd.write_json(workdir / wd.EVAL, {"step": 6, "params_total": 1000, "metrics": {"val/loss": loss, "len32/accuracy": acc},
                                          "provenance": {"time": "2026-12-06T10:00:00Z"}})
        for step in (3, 6):
            wd.append_metrics(workdir, {"step": step, "tokens": step * 128, "loss": loss + 1 / step, "eval/val/loss": loss})
    return experiment, runs


def test_synthetic_table_comparisons_and_wording(tmp_path):
    experiment, runs = _write_runs(tmp_path)
    results = tmp_path / "results"
    md_path, _ = report(experiment, "smoke", runs, results)
    text = md_path.read_text()
    lines = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    # Per-cell statistics: mean, t interval, per-seed values; accuracy: median and k/n solved.
    assert "| good | 5 | 1000 |  | 6 | 1.004 [0.99, 1.02] (1 / 1.01 / 0.99 / 1.02 / 1) | 0.5 |" in text
    lo, hi = stats.t_interval(VALUES["rec"][1])
    assert f"0.572 [{lo:.3g}, {hi:.3g}] (0.3 / 0.98 / 0.31 / 0.97 / 0.3) med 0.31, 2/5 ≥ 0.9" in lines["rec"]
    # The real difference is found, the null one is not, the bimodal one uses the sign-flip test.
    tests = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[1:-1]] for line in text.splitlines()
             if line.startswith("| good has") or line.startswith("| attention")}
    real, null, bimodal = tests["good has lower loss than bad"], tests["good has lower loss than same"], tests["attention recalls better"]
    assert real[-1] == "as expected" and float(real[-2]) < 0.05 and real[9] == "paired t"
    assert null[-1] == "not distinguishable" and float(null[-2]) > 0.05
    assert bimodal[9] == "sign-flip" and bimodal[10].startswith("0.0625 (min 0.0625)") and bimodal[-1] == "not distinguishable"
    assert "good < bad on val/loss: 1.004 vs 1.102 (p = 1.3e-05, Holm-adjusted 3.8e-05, paired t); as expected" in text
    assert "good vs same on val/loss: 1.004 vs 1.004, not distinguishable at n = 5 seeds (p = 1, " in text
    assert "a sign-flip test cannot go below p = 0.0625 at this n" in text
    assert "n = 5 seeds per cell" in text and "evaluated 2026-12-06" in text
    rows = list(csv.DictReader((results / "synthetic_smoke.csv").open()))
    assert len(rows) == 25 and [r["seed"] for r in rows[:5]] == ["0", "1", "2", "3", "4"]


def test_seeds_per_cell_pair_the_seeds_both_cells_ran(tmp_path):
    """SEEDS(scale, cell): 'same' runs 3 seeds, the others 5; its comparison pairs seeds 0-2 only and
    the header says both counts. A count that is not an int >= 1 is a one-line error."""
    from cfm_jax.errors import UserError

    per_cell = EXPERIMENT.replace("SEEDS = 5", "def SEEDS(scale, cell):\n    return 3 if cell == 'same' else 5")
    experiment, runs = _write_runs(tmp_path, per_cell)
    assert experiment.seed_counts("smoke") == [3, 5] and "same.s2" in experiment.cells("smoke")
    assert "same.s3" not in experiment.cells("smoke") and "good.s4" in experiment.cells("smoke")
    md_path, _ = report(experiment, "smoke", runs, tmp_path / "results")
    text = md_path.read_text()
    assert "n = 3 or 5 seeds per cell, as the seeds column says" in text
    assert "| same | 3 |" in text and "| good | 5 |" in text
    null = next(line for line in text.splitlines() if line.startswith("| good has lower loss than same"))
    assert null.split("|")[9].strip() == "3"  # n: the three seeds both cells ran
    (tmp_path / "bad.py").write_text(EXPERIMENT.replace("SEEDS = 5", "def SEEDS(scale, cell):\n    return 0"))
    with pytest.raises(UserError, match=r"SEEDS\('smoke', 'good'\) must be an int >= 1, not 0"):
        load_experiment(str(tmp_path / "bad.py")).cells("smoke")
    (tmp_path / "bug.py").write_text(EXPERIMENT.replace("SEEDS = 5", "def SEEDS(scale, cell):\n    return {}[cell]"))
    with pytest.raises(UserError, match=r"SEEDS\('smoke', 'good'\) failed: KeyError: 'good'"):
        load_experiment(str(tmp_path / "bug.py")).cells("smoke")


def test_covered_seconds_counts_side_by_side_runs_once():
    # Two 10-minute runs ending 2 minutes apart overlap for 8 minutes (12 covered); a third, an hour
    # later, adds its own minute; an interval inside another adds nothing.
    ends = ["2026-01-01T00:10:00Z", "2026-01-01T00:12:00Z", "2026-01-01T01:00:00Z", "2026-01-01T00:09:00Z"]
    assert covered_seconds(ends, [600, 600, 60, 60]) == 13 * 60
    assert covered_seconds(ends[:1], [600]) == 600


def test_report_regenerates_from_committed_records_byte_identical(tmp_path):
    experiment, runs = _write_runs(tmp_path)
    results = tmp_path / "results"
    report(experiment, "smoke", runs, results)
    first = {p.name: p.read_bytes() for p in results.iterdir() if p.is_file()}
    record = results / "runs" / "synthetic" / "smoke" / "good.s0"
    assert sorted(p.name for p in record.iterdir()) == ["config.json", "eval.json", "metrics.jsonl"]
    shutil.rmtree(runs)  # a fresh clone: no workdirs, only the committed records
    report(experiment, "smoke", runs, results)
    assert {p.name: p.read_bytes() for p in results.iterdir() if p.is_file()} == first
    assert "synthetic_smoke_curves.png" in first


def test_record_of_another_config_is_not_used_and_partial_tables_are_refused(tmp_path):
    from cfm_jax.errors import UserError

    experiment, runs = _write_runs(tmp_path)
    results = tmp_path / "results"
    report(experiment, "smoke", runs, results)
    shutil.rmtree(runs)
    changed = tmp_path / "changed.py"
    (tmp_path / "synthetic.py").write_text(EXPERIMENT.replace('("good", 1e-3)', '("good", 1.5e-3)'))
    experiment = load_experiment(str(tmp_path / "synthetic.py"))
    with pytest.raises(UserError, match="refusing to replace .*synthetic_smoke.md with a partial table"):
        report(experiment, "smoke", runs, results)
    report(experiment, "smoke", runs, results, force=True)
    text = (results / "synthetic_smoke.md").read_text()
    assert "| good | 0 |" in text and "5 of 5 runs missing" in text and not changed.exists()


LR_EXPERIMENT = '''"""LR grid: two cells, three learning rates, the middle one best for 'a' and the largest diverging."""
SEEDS = 2
LR_GRID = [1e-3, 1e-2, 1e30]
SELECT = ("val/loss", "min")
COLUMNS = ["val/loss"]


def cells(scale):
    base = ["model.d_model=32", "data.seq_len=32", "train.batch_size=4", "train.steps=3", "data.eval_batches=1",
            "train.warmup_steps=0", "train.log_every=1"]
    return {"a": base, "b": base + ["model.ffn.activation=relu"]}
'''


def test_lr_grid_sweep_runs_a_picked_cells_seeds_before_the_next_cells_tuning(tmp_path):
    """Cells finish in the experiment's order: 'a' picked, its seed 1 runs before 'b''s tuning runs."""
    from cfm_jax.harness.sweep import _unfinished

    path = tmp_path / "lrx.py"
    path.write_text(LR_EXPERIMENT)
    experiment = load_experiment(str(path))
    configs = experiment.configs("smoke", {"a": 1e-2})
    todo = _unfinished(experiment, "smoke", tmp_path / "runs", configs, (0, 1), lambda *_: None, {})
    assert [name for name, _ in todo] == ["a.lr0.001.s0", "a.lr0.01.s0", "a.lr1e+30.s0", "a.lr0.01.s1",
                                          "b.lr0.001.s0", "b.lr0.01.s0", "b.lr1e+30.s0"]


@pytest.mark.slow  # default tier kept near 10 min on 2 cores; `make test-slow` runs it
def test_lr_grid_tunes_then_runs_seeds_at_the_picked_lr(tmp_path, capsys):
    """Tuning runs first (seed 0 at every grid lr; the 1e30 one diverges and counts as the worst), then
    each cell's remaining seeds at the lr with the lowest validation loss; the table shows the picks and
    the report regenerates from records as any other."""
    from cfm_jax.harness.sweep import sweep

    path = tmp_path / "lrx.py"
    path.write_text(LR_EXPERIMENT)
    experiment = load_experiment(str(path))
    runs, results = tmp_path / "runs", tmp_path / "results"
    assert sweep(experiment, "smoke", runs, progress=False) == []  # the diverged tuning runs are not failures
    err = capsys.readouterr().err
    assert err.count("a tuning run diverged") == 2
    done = sorted(p.name for p in (runs / "lrx" / "smoke").iterdir())
    tuning = {f"{c}.lr{lr}.s0" for c in "ab" for lr in ("0.001", "0.01", "1e+30")}
    assert tuning <= set(done) and len(done) == 8  # + one more seed per cell, at its picked lr
    md_path, _ = report(experiment, "smoke", runs, results)
    text = md_path.read_text()
    assert "## Learning rates" in text and "| lr 0.001 | lr 0.01 | lr 1e+30 | picked |" in text
    row = next(line for line in text.splitlines() if line.startswith("| a |") and "not run / diverged" in line)
    picked = row.split("|")[-2].strip()
    assert f"a.lr{picked}.s1" in done
    first = {p.name: p.read_bytes() for p in results.iterdir() if p.is_file()}
    shutil.rmtree(runs)
    report(experiment, "smoke", runs, results)
    assert {p.name: p.read_bytes() for p in results.iterdir() if p.is_file()} == first


def test_margin_comparison_tests_within_a_relative_margin():
    """margin=0.01, expect less: 'a below 1.01 x b'. A cell 0.3 % worse than the reference in every
    seed is shown within 1 %; one 3 % worse is found outside it; the table names the scaled side."""
    from cfm_jax.harness.experiments import Experiment
    from cfm_jax.harness.report import comparisons_markdown, run_comparisons

    ref = [2.00, 2.10, 1.95, 2.05, 2.00]
    noise = [0.001, -0.002, 0.0, 0.002, -0.001]
    cells = {"ref": ref, "near": [v * 1.003 + e for v, e in zip(ref, noise)], "far": [v * 1.03 + e for v, e in zip(ref, noise)]}
    rows = [{"base": c, "seed": s, "val/loss": v} for c, vals in cells.items() for s, v in enumerate(vals)]
    within = lambda a: stats.Comparison(a, "ref", "val/loss", "less", f"{a} within 1 %", margin=0.01)
    experiment = Experiment("x", Path("x.py"), lambda scale: {c: [] for c in cells}, (), "", comparisons=(within("near"), within("far")))
    near, far = run_comparisons(experiment, "smoke", rows)
    assert near["verdict"] == "as expected" and far["verdict"] == "opposite"
    assert near["mean_b"] == pytest.approx(1.01 * sum(ref) / 5)
    assert near["text"].startswith("near < 1.01 x ref on val/loss")
    assert "| far within 1 % | far | 1.01 x ref | val/loss |" in comparisons_markdown([near, far])
    with pytest.raises(ValueError, match="margin=-2"):
        stats.Comparison("a", "b", "val/loss", "less", margin=-2)


def test_short_wording_keeps_small_differences_and_says_when_a_claim_is_untested():
    found = {"verdict": "as expected", "diff": 0.0023, "ci": (0.0009, 0.0037), "p_holm": 0.024, "n": 5}
    assert stats.short_wording(found) == "found (difference +0.0023, 95 % interval [+0.0009, +0.0037], Holm p = 0.024)"
    big = {**found, "verdict": "not distinguishable", "diff": 0.7, "ci": (-0.6, 2.0), "p_holm": 0.3}
    assert stats.short_wording(big) == "not shown (difference +0.70, 95 % interval [-0.60, +2.00], Holm p = 0.3)"
    near_zero = {**big, "diff": 0.0097, "ci": (-0.0003, 0.0197)}
    assert "(difference +0.0097, 95 % interval [-0.0003, +0.0197]," in stats.short_wording(near_zero)
    one = {"verdict": "not distinguishable", "diff": 0.1, "ci": (math.nan, math.nan), "p_holm": math.nan, "n": 1}
    assert stats.short_wording(one) == "not tested yet (1 seed so far, difference +0.10)"
    assert stats.short_wording({"verdict": "not run", "n": 0}) == "not tested yet (a cell has no finished seed)"
    # Every seed in the expected direction, but the t test does not pass (one seed's drop is far larger):
    drops = [0.0018, 0.0017, 0.0027, 0.0019, 0.002, 0.0144, 0.0034, 0.0226, 0.0437, 0.0027]
    result = stats.compare([1.0] * 10, [1.0 - d for d in drops])
    assert (result["n_greater"], result["n_less"]) == (10, 0) and result["p"] > 0.05
    row = {**result, "expect": "greater", "verdict": "not distinguishable", "p_holm": result["p"]}
    assert stats.short_wording(row).endswith(f"Holm p = {result['p']:.2g}; in the expected direction in 10 of 10 seeds)")
    assert stats.short_wording({**row, "expect": "less"}).endswith("in the expected direction in 0 of 10 seeds)")
    assert "seeds)" not in stats.short_wording({**row, "verdict": "as expected"})


def test_both_below_reads_each_side_from_its_own_column():
    rows = {"m-d64": {"kv4": 0.003, "kv16": 0.001}, "m-d256": {"kv4": 0.9, "kv16": 0.04}}
    drop = {"a": "m-d64", "b": "m-d64", "column": "kv4 vs kv16"}
    assert stats.both_below(drop, rows, 0.05) and not stats.both_below(drop, rows, 0.002)
    assert not stats.both_below({"a": "m-d256", "b": "m-d64", "column": "kv4"}, rows, 0.05)  # 0.9 vs 0.003
    assert stats.both_below({"a": "m-d256", "b": "m-d64", "column": "kv16"}, rows, 0.05)
    assert not stats.both_below({"a": "m-d512", "b": "m-d64", "column": "kv16"}, rows, 0.05)  # a cell not finished
