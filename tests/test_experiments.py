"""Every shipped experiment file parses at every scale; a sweep + report runs end to end."""

from __future__ import annotations

import csv
import shutil

import pytest

from cfm_jax.config import SCALES
from cfm_jax.harness.experiments import list_experiments, load_experiment
from cfm_jax.harness.report import report
from cfm_jax.harness.sweep import sweep


@pytest.mark.parametrize("name", list_experiments())
@pytest.mark.parametrize("scale", list(SCALES))
def test_experiment_parses(name, scale):
    experiment = load_experiment(name)
    assert experiment.doc, "experiment files document command, runtime and expected result"
    assert experiment.configs(scale)  # every cell resolves and validates


def test_sweep_skips_finished_cells_and_reports_one_row_per_cell(tmp_path, capsys):
    path = tmp_path / "tiny.py"
    path.write_text(
        '"""Tiny: two cells."""\n'
        "def cells(scale):\n"
        "    base = ['model.d_model=32', 'data.seq_len=32', 'train.batch_size=4', 'train.steps=6', 'data.eval_batches=1']\n"
        "    return {'text': base, 'mqar': base + ['data.task=mqar', 'data.vocab_size=64', 'data.num_kv_pairs=2']}\n"
    )
    experiment = load_experiment(str(path))
    runs, results = tmp_path / "runs", tmp_path / "results"
    assert sweep(experiment, "smoke", runs, progress=False) == []
    capsys.readouterr()
    assert sweep(experiment, "smoke", runs, progress=False) == []
    assert capsys.readouterr().err.count("done, skipped") == 2
    md_path, table = report(experiment, "smoke", runs, results)
    assert md_path == results / "tiny_smoke.md"
    rows = list(csv.DictReader((results / "tiny_smoke.csv").open()))
    assert [r["cell"] for r in rows] == ["text", "mqar"]
    assert float(rows[0]["val/bits_per_byte"]) > 0 and 0 <= float(rows[1]["len32/accuracy"]) <= 1
    assert all(r["command"].startswith("cfm-jax train --workdir") for r in rows)
    assert "cfm-jax report tiny --scale smoke" in md_path.read_text()
    # On another machine (no workdirs), the committed records count as done; --retrain trains again.
    shutil.rmtree(runs)
    assert sweep(experiment, "smoke", runs, progress=False, results_dir=results) == []
    assert capsys.readouterr().err.count("committed record matches, skipped") == 2 and not runs.exists()
    assert sweep(experiment, "smoke", runs, progress=False, results_dir=results, retrain=True) == []
    assert (runs / "tiny" / "smoke" / "mqar" / "eval.json").exists()


def test_sweep_runs_every_other_cell_when_one_workdir_holds_an_edited_cells_old_run(tmp_path, capsys):
    """After an experiment file changes one cell, that cell's workdir holds a run of the old config:
    the sweep leaves it untouched, trains the other cells, then stops with one error naming it."""
    from cfm_jax.errors import UserError

    base = "['model.d_model=32', 'data.seq_len=32', 'train.batch_size=4', 'train.steps=4', 'data.eval_batches=1']"
    path = tmp_path / "e.py"
    path.write_text(f'"""E."""\ndef cells(scale):\n    return {{"edited": {base}}}\n')
    runs = tmp_path / "runs"
    assert sweep(load_experiment(str(path)), "smoke", runs, progress=False) == []
    old_eval = (runs / "e" / "smoke" / "edited" / "eval.json").read_text()
    path.write_text(f'"""E."""\ndef cells(scale):\n    return {{"edited": {base} + ["train.lr=0.002"], "new": {base}}}\n')
    with pytest.raises(UserError, match=r"1 cell\(s\) not run .* e.g. edited: .*train.lr.*move or delete"):
        sweep(load_experiment(str(path)), "smoke", runs, progress=False)
    assert "edited: NOT RUN" in capsys.readouterr().err
    assert (runs / "e" / "smoke" / "new" / "eval.json").exists()
    assert (runs / "e" / "smoke" / "edited" / "eval.json").read_text() == old_eval  # the old run is kept


def test_a_cell_identical_to_another_experiments_run_is_shared_not_retrained(tmp_path, capsys):
    """Experiment b repeats one of a's cells exactly: b's sweep trains only its other cell, b's report
    reads the shared run and exports it as b's own record (a fresh clone regenerates b from b's records);
    a cell that differs in one setting is not shared, and --retrain shares nothing."""
    base = "['model.d_model=32', 'data.seq_len=32', 'train.batch_size=4', 'train.steps=4', 'data.eval_batches=1']"
    (tmp_path / "a.py").write_text(f'"""A."""\ndef cells(scale):\n    return {{"x": {base}}}\n')
    (tmp_path / "b.py").write_text(f'"""B."""\ndef cells(scale):\n    return {{"same": {base}, '
                                   f'"other": {base} + ["train.lr=0.002"]}}\n')
    a, b = load_experiment(str(tmp_path / "a.py")), load_experiment(str(tmp_path / "b.py"))
    runs, results = tmp_path / "runs", tmp_path / "results"
    assert sweep(a, "smoke", runs, progress=False) == []
    capsys.readouterr()
    assert sweep(b, "smoke", runs, progress=False, results_dir=results) == []
    err = capsys.readouterr().err
    assert "same: the same run finished for a, skipped" in err and "other: training in" in err
    assert not (runs / "b" / "smoke" / "same").exists()
    report(b, "smoke", runs, results)
    rows = list(csv.DictReader((results / "b_smoke.csv").open()))
    assert [r["cell"] for r in rows] == ["same", "other"] and all(r["val/bits_per_byte"] for r in rows)
    assert (results / "runs" / "b" / "smoke" / "same" / "eval.json").read_text() == (runs / "a" / "smoke" / "x" / "eval.json").read_text()
    shutil.rmtree(runs)  # a fresh clone: b regenerates from its own records
    report(b, "smoke", runs, results)
    assert list(csv.DictReader((results / "b_smoke.csv").open())) == rows
    assert sweep(b, "smoke", tmp_path / "runs2", progress=False, results_dir=results, retrain=True) == []
    assert (tmp_path / "runs2" / "b" / "smoke" / "same" / "eval.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["memory_horizon", "moe_balance"])
def test_experiment_smoke_sweep_and_report(tmp_path, name):
    """A long-context and an efficiency experiment at smoke scale, end to end: md (with intervals and
    the declared comparisons' table) + csv + png + curves + reading + run records."""
    experiment = load_experiment(name)
    assert sweep(experiment, "smoke", tmp_path / "runs", progress=False, workers=2) == []
    md_path, _ = report(experiment, "smoke", tmp_path / "runs", tmp_path / "results")
    text = md_path.read_text()
    assert "## Reading" in text and f"cfm-jax report {name} --scale smoke" in text and "## Comparisons" in text
    assert " [" in text and "n = 5 seeds per cell" in text  # mean [95 % interval]
    assert (tmp_path / "results" / f"{name}_smoke_curves.png").stat().st_size > 0
    assert len(list((tmp_path / "results" / "runs" / name / "smoke").iterdir())) == len(experiment.cells("smoke"))
    rows = list(csv.DictReader((tmp_path / "results" / f"{name}_smoke.csv").open()))
    assert len(rows) == len(experiment.cells("smoke")) and "status" not in rows[0]  # every run finished
    assert all(r["step"] == "20" or r["step"] == "30" for r in rows)
    if experiment.plot_fn is not None:
        assert (tmp_path / "results" / f"{name}_smoke.png").stat().st_size > 0


def test_long_context_declares_its_claims_and_reads_depth_and_length():
    """Hybrids have the depth of the pure models and within 10 % of the parameters of the recurrence
    they are compared with; the reading sorts models per task, shows the window's accuracy by needle
    depth, and words each declared claim by its test's verdict."""
    from cfm_jax.layers.model import build_model, param_counts

    experiment = load_experiment("long_context")
    configs = experiment.configs("cpu")
    params = {m: param_counts(build_model(configs[f"{m}-niah_multiquery.lr0.001.s0"].model, 256, 0))["params_total"]
              for m in ("gla", "mamba", "hybrid_gla", "hybrid_mamba")}
    for m in ("gla", "mamba"):
        assert configs[f"hybrid_{m}-niah_multiquery.lr0.001.s0"].model.layer_kinds() == (m, "attention")
        assert abs(params[f"hybrid_{m}"] / params[m] - 1) < 0.10
    assert experiment.lr_grid_for("cpu") == load_experiment("mqar_capacity").lr_grid_for("cpu")
    assert experiment.select_for("cpu") == ("len64/accuracy", "max")
    comps = experiment.comparisons_for("cpu")
    assert any(c.a == c.b == "sliding_window-niah_single" and c.column_b == "len64_depth0/accuracy" for c in comps)

    def row(cell, *accs, depths=()):
        r = {"cell": cell, **{f"len{64 * k}/accuracy": a for k, a in zip((1, 2, 4, 8), accs)}}
        r.update({f"len64_depth{d}/accuracy": a for d, a in zip((0, 25, 50, 75, 100), depths)})
        return r

    table = [row("attention-niah_single", 1.0, 0.9, 0.6, 0.3, depths=(1, 1, 1, 1, 1)),
             row("sliding_window-niah_single", 0.5, 0.3, 0.2, 0.15, depths=(0.02, 0.1, 0.5, 0.9, 1.0))]
    tests = [{"claim": "the window finds a needle near the query, not one at the start (its reach)",
              "verdict": "as expected", "diff": 0.98, "ci": (0.9, 1.06), "p_holm": 0.001}]
    text = experiment.reading_fn(table, tests)
    assert "- niah_single: learned by attention 1.00 -> 0.30; not by sliding_window 0.50 -> 0.15." in text
    assert "sliding window: 0% 0.02 / 25% 0.10 / 50% 0.50 / 75% 0.90 / 100% 1.00; attention: 1.00" in text
    assert "(its reach): found (difference +0.98" in text
    assert "- a sliding window recalls only within its reach: near vs far needle found (difference +0.98" in text
    assert "attention vs the window on the farthest needle not declared." in text
    assert experiment.reading_fn.__globals__["chance"]("passkey") == 0.1
    # The findings summary tallies each family of claims by verdict and names fixed-state mixers that learned a keyed task.
    table += [row("attention-variable_tracking", 1.0, 0.2, 0.1, 0.0), row("gla-variable_tracking", 0.95, 0.5, 0.2, 0.1),
              row("mamba-variable_tracking", 0.01, 0.01, 0.0, 0.0)]
    claim = lambda m: f"variable_tracking: attention retrieves by key better than {m}"
    tests += [{"a": "attention-variable_tracking", "b": "gla-variable_tracking", "claim": claim("gla"), "n": 3,
               "verdict": "not distinguishable", "diff": 0.05, "ci": (-0.1, 0.2), "p_holm": 0.6},
              {"a": "attention-variable_tracking", "b": "mamba-variable_tracking", "claim": claim("mamba"), "n": 3,
               "verdict": "as expected", "diff": 0.99, "ci": (0.9, 1.1), "p_holm": 0.001},
              {"a": "attention-variable_tracking", "b": "rwkv-variable_tracking", "claim": claim("rwkv"), "n": 1,
               "verdict": "not distinguishable", "diff": 0.5, "ci": (float("nan"),) * 2, "p_holm": float("nan")}]
    text = experiment.reading_fn(table, tests)
    assert ("- attention retrieves by key better than a fixed-state mixer (Zoology): found in 1 of 3 "
            "(variable_tracking mamba); 1 not tested yet.") in text
    assert "adds key-matched recall to a recurrent stack (Jamba; Zoology's hybrids): not declared." in text
    assert "learned a key-matched task anyway (>= 0.9 at the training length, where their state sufficed): gla on variable_tracking (0.95)." in text


def test_mqar_capacity_declares_zoologys_claims_and_words_them_from_the_tests():
    """The comparisons are Zoology's two claims per fixed-state mixer (fewer pairs better at the
    smallest width; more width better at the most pairs); the reading flags attention below 0.95 and
    words each claim by its test's verdict only."""
    experiment = load_experiment("mqar_capacity")
    comps = experiment.comparisons_for("cpu")
    assert len(comps) == 2 * 5 and {c.a.split("-")[0] for c in comps} == {"based", "mamba", "gla", "rwkv", "sliding_window"}
    few = next(c for c in comps if c.a == "mamba-d64" and c.b == "mamba-d64")
    assert (few.column, few.column_b, few.expect) == ("len64kv4/accuracy", "len64kv16/accuracy", "greater")
    wide = next(c for c in comps if c.a == "mamba-d256")
    assert (wide.b, wide.column, wide.expect) == ("mamba-d64", "len64kv16/accuracy", "greater")

    def row(cell, *accs):
        return {"cell": cell, **{f"len64kv{k}/accuracy": a for k, a in zip((4, 8, 12, 16), accs)}}

    table = [row("attention-d64", 1.0, 0.99, 0.97, 0.90), row("attention-d256", 1.0, 1.0, 1.0, 0.99),
             row("mamba-d64", 0.8, 0.5, 0.3, 0.1), row("mamba-d256", 0.9, 0.8, 0.7, 0.6)]
    tests = [{"a": "mamba-d64", "b": "mamba-d64", "column": "len64kv4/accuracy vs len64kv16/accuracy",
              "claim": "mamba: 4 pairs recalled better than 16 at width 64", "verdict": "as expected", "diff": 0.7,
              "ci": (0.6, 0.8), "p_holm": 0.01},
             {"a": "mamba-d256", "b": "mamba-d64", "column": "len64kv16/accuracy",
              "claim": "mamba: width 256 recalls 16 pairs better than width 64", "verdict": "not distinguishable",
              "diff": 0.5, "ci": (-0.2, 1.2), "p_holm": 0.3}]
    text = experiment.reading_fn(table, tests)
    assert "Attention does NOT reach 0.95 everywhere: attention-d64 at 16 pairs 0.90" in text
    assert "- mamba: d64 0.80 / 0.50 / 0.30 / 0.10; d256 0.90 / 0.80 / 0.70 / 0.60." in text
    assert "4 pairs recalled better than 16 at width 64: found (difference +0.70" in text
    assert "width 256 recalls 16 pairs better than width 64: not shown (difference +0.50" in text
    assert "a significant drop from the fewest to the most pairs at the smallest width in 1 of 5 fixed-state mixers (mamba)" in text
    assert "a significant rise with width at the most pairs in 0 (none)" in text
    assert "decoding state" not in text
    table[0] = row("attention-d64", 1.0, 0.99, 0.97, 0.96)
    assert "Attention reaches >= 0.95 mean accuracy in every cell" in experiment.reading_fn(table, tests)
    for r, state in zip(table, (65536, 262144, 151584, 40000)):  # mamba-d64's state above attention's cache
        r["state_bytes/64"] = state
    text = experiment.reading_fn(table, tests)
    assert ("  At d64 its decoding state (151.6 KB) is 2.3x attention's KV cache at 64 tokens (65.5 KB): "
            "no capacity limit is expected there.") in text
    assert "At d256 its decoding state" not in text
    tests[1].update(n=1, verdict="not distinguishable", ci=(float("nan"),) * 2)  # d256 has one seed so far
    text = experiment.reading_fn(table, tests)
    assert "width 256 recalls 16 pairs better than width 64: not tested yet (1 seed so far" in text
    assert "a significant rise with width at the most pairs in 0 (none, 1 not tested yet)" in text
    table.append(row("sliding_window-d64", 0.06, 0.02, 0.01, 0.01))
    assert "stacked windows reach 31 tokens back for 0.78 / 0.73 / 0.65 / 0.49" in experiment.reading_fn(table, tests)
    table[3]["len64kv4/accuracy_values"] = [0.95, 0.85, 0.9]  # none stuck: no split
    assert "seeds split" not in experiment.reading_fn(table, tests)
    table[3]["len64kv4/accuracy_values"] = [0.99, 0.01, 0.9, 0.2]
    assert ("  At d256 its seeds split at 4 pairs: 2 of 4 reach 0.9 and 1 of 4 never left the plateau (< 0.05); "
            "the mean describes no run.") in experiment.reading_fn(table, tests)
    table[2] = row("mamba-d64", 0.003, 0.002, 0.001, 0.001)  # a passing drop between two unlearned numbers
    text = experiment.reading_fn(table, tests)
    assert ("4 pairs recalled better than 16 at width 64: found (difference +0.70" in text
            and "both sides are below 0.05, so it is not counted as a recall finding." in text)
    assert "a significant drop from the fewest to the most pairs at the smallest width in 0 of 5 fixed-state mixers (none)" in text


def test_mqar_window_reach_counts_answers_whose_value_is_in_the_window():
    """Against a plain loop over the same sample: the value of key i sits at 2i + 1, the query's answer
    position q holds the key; in reach when q - (2i + 1) < window."""
    import numpy as np

    from cfm_jax.data.base import IGNORE
    from cfm_jax.data.mqar import mqar_batch

    import runpy

    window_reach = runpy.run_path(str(load_experiment("mqar_capacity").path))["window_reach"]
    inputs, labels = mqar_batch(np.random.default_rng(0), 50, 64, 4096, 8)
    hits = [[0, 0], 0]
    for b in range(50):
        for q in np.nonzero(labels[b] != IGNORE)[0]:
            i = list(inputs[b, 0:16:2]).index(inputs[b, q])
            hits[0][0] += q - (2 * i + 1) < 16
            hits[0][1] += q - (2 * i + 1) < 31
            hits[1] += 1
    assert window_reach(64, 8, (16, 31), rows=50) == [hits[0][0] / hits[1], hits[0][1] / hits[1]]
    assert window_reach(64, 4, (64,), rows=50) == [1.0]


def test_mqar_capacity_runs_ten_seeds_at_the_narrowest_width_three_at_the_others():
    experiment = load_experiment("mqar_capacity")
    runs = experiment.cells("cpu", {base: 1e-3 for base in experiment.base_cells("cpu")})
    assert experiment.seed_counts("cpu") == [3, 10]
    assert "rwkv-d64.lr0.001.s9" in runs and "rwkv-d64.lr0.001.s10" not in runs
    assert "rwkv-d128.lr0.001.s2" in runs and "rwkv-d128.lr0.001.s3" not in runs and "rwkv-d256.lr0.001.s3" not in runs


def test_recall_vs_state_varies_one_knob_of_mqar_capacitys_narrowest_cells():
    """Each cell is mqar_capacity's narrowest cell of its mixer plus one state knob; the equal-state
    claims name existing cells, and the reading lists cells by state and words claims by verdict."""
    experiment, capacity = load_experiment("recall_vs_state"), load_experiment("mqar_capacity")
    cells, base = experiment.base_cells("cpu"), capacity.base_cells("cpu")
    assert len(cells) == 18 and cells["mamba-v4"] == [*base["mamba-d64"], "model.mixer.d_state=4"]
    assert experiment.lr_grid_for("cpu") == capacity.lr_grid_for("cpu")  # else the shared cells are not shared
    assert experiment.seed_counts("cpu") == [5, 10] and capacity.seeds_for("cpu", "mamba-d64") >= 5  # shares seeds 0-4
    assert [experiment.seeds_for("cpu", c) for c in ("rwkv-v4", "rwkv-v16", "sliding_window-v8", "sliding_window-v16")] == [10, 10, 10, 5]
    assert capacity.seeds_for("cpu", "rwkv-d64") >= 10 and experiment.seed_counts("smoke") == [5]
    assert cells["sliding_window-v8"].count("model.mixer.window=16") == 0 and cells["sliding_window-v8"][-1] == "model.mixer.window=8"
    assert cells["gla-v25"][-1] == "model.mixer.expand_k=0.25"
    assert cells["attention-v2"][-2:] == ["model.mixer.n_heads=2", "model.mixer.n_kv_heads=1"]
    from cfm_jax.harness.records import result_key

    same = {"attention-v1": "attention-d64", "sliding_window-v16": "sliding_window-d64", "based-v16": "based-d64",
            "mamba-v16": "mamba-d64", "gla-v50": "gla-d64", "rwkv-v4": "rwkv-d64"}  # shared, trained once
    for mine, theirs in same.items():
        assert result_key(experiment.configs("cpu")[f"{mine}.lr0.0003.s0"]) == result_key(capacity.configs("cpu")[f"{theirs}.lr0.0003.s0"])
    comps = experiment.comparisons_for("cpu")  # raises if a claim names a cell that does not exist
    assert len(comps) == 12 and all(c.column == "len64kv16/accuracy" for c in comps)
    table = [{"cell": "mamba-v4", "len64kv16/accuracy": 0.2, "state_bytes/64": 7168},
             {"cell": "sliding_window-v8", "len64kv16/accuracy": 0.1, "state_bytes/64": 8192}]
    tests = [{"claim": "mamba-v4 above sliding_window-v8 at about equal state (Based)", "verdict": "not distinguishable",
              "diff": 0.1, "ci": (-0.1, 0.3), "p_holm": 0.4, "a": "mamba-v4", "b": "sliding_window-v8",
              "column": "len64kv16/accuracy", "n": 5}]
    text = experiment.reading_fn(table, tests)
    assert text.index("- mamba-v4: 0.20 with 7.0 KB") < text.index("- sliding_window-v8: 0.10 with 8.0 KB")
    assert "at about equal state (Based): not shown (difference +0.10" in text
    assert "recall rises with state in 0 of 6 families (none); at about equal state, a cell above the other in 0 of 6" in text
    table += [{"cell": "mamba-v16", "len64kv16/accuracy": 0.002}, {"cell": "rwkv-v4", "len64kv16/accuracy": 0.6},
              {"cell": "rwkv-v16", "len64kv16/accuracy": 0.2}]
    rise = lambda m, lo, hi: {"a": f"{m}-v{hi}", "b": f"{m}-v{lo}", "column": "len64kv16/accuracy", "n": 5,
                              "claim": f"{m}: more state, better recall", "verdict": "as expected", "diff": 0.4,
                              "ci": (0.3, 0.5), "p_holm": 0.01}
    tests += [rise("mamba", 4, 16), {**rise("rwkv", 16, 4), "a": "rwkv-v4", "b": "rwkv-v16"}]
    text = experiment.reading_fn(table, tests)
    assert "mamba: more state, better recall: found (difference +0.40" in text and "; both sides are below 0.05, so it says" not in text
    table[0]["len64kv16/accuracy"] = 0.003  # mamba-v4: now a passing difference between two unlearned numbers
    text = experiment.reading_fn(table, tests)
    assert "mamba: more state, better recall: found (difference +0.40, 95 % interval [+0.30, +0.50], Holm p = 0.01); both sides are below 0.05" in text
    assert "recall rises with state in 1 of 6 families (rwkv)" in text


def test_committed_quickstart_table_regenerates_from_its_records(tmp_path, monkeypatch):
    """What a fresh clone can do without training: `cfm-jax report quickstart --scale smoke` rebuilds
    the committed md and csv byte for byte from the committed run records (and draws the plots)."""
    from pathlib import Path

    committed = Path(__file__).resolve().parents[1] / "experiments" / "results"
    results = tmp_path / "results"
    (results / "runs").mkdir(parents=True)
    shutil.copytree(committed / "runs" / "quickstart" / "smoke", results / "runs" / "quickstart" / "smoke")
    names = ("quickstart_smoke.md", "quickstart_smoke.csv")
    for name in names:
        shutil.copyfile(committed / name, results / name)
    monkeypatch.chdir(tmp_path)  # no runs/ here: only the records count
    report(load_experiment("quickstart"), "smoke", Path("runs"), results)
    for name in names:
        assert (results / name).read_bytes() == (committed / name).read_bytes(), name
    assert (results / "quickstart_smoke_curves.png").stat().st_size > 0


def test_param_efficiency_reading_density_intervals_from_synthetic_seeds():
    """Rows built on a known dense curve L(N) = 40 N^-0.3 + 1.5 with seed noise: the reading fits it,
    reports each row's density with a bootstrap interval (a row worth 2x its size lands near 2, the
    dense rows near 1, the noise floor spans them), and words the declared comparisons it is given."""
    experiment = load_experiment("param_efficiency")
    curve = lambda n: 40.0 * n**-0.3 + 1.5
    shift = [0.004, -0.003, 0.001]  # per-seed offsets shared by every row (same data order)

    def row(cell, n, loss_n, active):
        values = [curve(loss_n) + s for s in shift]
        return {"cell": cell, "val/loss": sum(values) / 3, "val/loss_values": values, "params_non_embedding": n,
                "params_active_per_token": active, "ffn_params_active_per_token": active / 2,
                "val/bits_per_byte": sum(values) / 3 / 0.693}

    table = [row(f"dense_swiglu-d{d}-s400", n, n, n) for d, n in ((48, 1e5), (64, 2e5), (80, 4e5), (96, 8e5))]
    table.append(row("ns_relu-d64-s400", 2e5, 4e5, 1e5))  # the loss of a 2x larger dense model, half active
    text = experiment.reading_fn(table, tests=[])
    assert "L(N) = 40 N^-0.300 + 1.501" in text  # L_inf shifted by the mean seed offset, 0.0007
    ns_line = next(line for line in text.splitlines() if line.startswith("| ns_relu-d64-s400"))
    density_total, density_active = ns_line.split("|")[6:8]
    assert density_total.strip().startswith("2.00 [") and density_active.strip().startswith("4.00 [")
    assert "dense reference rows' own densities span 1.00-1.00" in text
