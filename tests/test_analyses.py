"""Neuron analyses: CETT on a constructed case, AP, Spearman, clustering, and `eval --analysis` end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cfm_jax.cli import main
from cfm_jax.config import resolve
from cfm_jax.harness.bricks import average_precision, balanced_kmeans, copy_batch, top_group_share
from cfm_jax.harness.cett import layer_cett, threshold_for_cett
from cfm_jax.harness.neurons import spearman
from cfm_jax.data import IGNORE
from cfm_jax.train import train


def test_cett_constructed_case():
    # Orthogonal neuron outputs: W_d rows are unit vectors. Token activations (3, 4, 0): FFN norm 5.
    w_down = np.eye(3, dtype=np.float64)
    norms = np.ones(3)
    a = np.array([[3.0, 4.0, 0.0]])
    assert layer_cett(a, w_down, norms, eps=2.0) == 0.0  # only the zero neuron is dropped
    assert layer_cett(a, w_down, norms, eps=3.5) == pytest.approx(3 / 5)  # neuron 0 (norm 3) dropped
    assert layer_cett(a, w_down, norms, eps=4.5) == pytest.approx(1.0)
    # The largest eps whose CETT stays <= tau: tau 0.6 reaches the neuron of norm 4; tau 0.5 stops at 3.
    assert threshold_for_cett(a, w_down, norms, 0.6) == pytest.approx(4.0, rel=1e-6)
    assert threshold_for_cett(a, w_down, norms, 0.5) == pytest.approx(3.0, rel=1e-6)
    # Column norms scale neuron output norms: a W_d row of norm 2 doubles neuron 0's norm to 6.
    w2 = np.diag([2.0, 1.0, 1.0])
    assert layer_cett(a, w2, np.array([2.0, 1.0, 1.0]), eps=5.0) == pytest.approx(4 / np.hypot(6, 4))


def test_average_precision_and_spearman():
    scores = np.array([[0.9], [0.8], [0.7], [0.1]])
    positive = np.array([True, False, True, False])
    assert average_precision(scores, positive)[0] == pytest.approx((1 / 1 + 2 / 3) / 2)
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 2, 2], [1, 2, 3, 4]) == pytest.approx(np.corrcoef([1.5, 1.5, 3.5, 3.5], [1, 2, 3, 4])[0, 1])


def test_balanced_kmeans_recovers_planted_groups():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(4), 8)  # 32 neurons in 4 co-activating groups
    tokens = rng.integers(0, 4, 500)  # each token activates one group
    active = (groups[None, :] == tokens[:, None]).astype(np.float32)
    labels = balanced_kmeans(active.T @ active, 4)
    assert np.bincount(labels).tolist() == [8, 8, 8, 8]
    for g in range(4):  # every planted group lands in a single cluster
        assert len(set(labels[groups == g])) == 1
    assert top_group_share(active, labels, 4, 1) == pytest.approx(1.0)
    assert top_group_share(active, rng.permutation(groups), 4, 1) < 0.9


def test_copy_batch_scores_the_copy():
    batch = copy_batch(np.random.default_rng(0), 2, 11, 20)
    x, y = batch["inputs"][0], batch["labels"][0]
    assert x.shape == (11,) and x[5] == 0  # 5 tokens, the separator, the copy
    np.testing.assert_array_equal(y[5:10], x[:5])
    assert np.all(y[:5] == IGNORE) and y[10] == IGNORE


@pytest.fixture(scope="module")
def sparse_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ns") / "w"
    cfg = resolve("smoke", ["model.ffn=neuron_sparse", "model.d_model=32", "data.seq_len=64", "train.batch_size=4",
                            "train.steps=10", "data.eval_batches=2"])
    train(cfg, workdir, progress=False)
    return workdir


def test_eval_with_all_analyses(sparse_run, capsys):
    assert main(["eval", "--workdir", str(sparse_run), "--analysis", "all"]) == 0
    result = json.loads((sparse_run / "eval.json").read_text())
    assert 0 < result["stats"]["ffn/activation_ratio"] < 1
    for key in ("active_p50", "active_p99", "union_ratio_8", "union_ratio_64", "union_ratio_batch", "top10_share"):
        assert f"ffn/{key}" in result["stats"]
    cett = result["cett"]
    sparsities = [p["sparsity"] for p in cett["curve"]]
    assert sparsities == sorted(sparsities) and cett["natural_sparsity"] <= sparsities[0]
    assert (cett["cett_ppl1"] is None) == (cett["note"] is not None)
    dyn = result["dynamic"]
    assert {"text", "mqar_easy", "mqar_hard"} <= set(dyn) and -1 <= dyn["text"]["spearman"] <= 1
    assert dyn["mqar_easy"]["num_kv_pairs"] < dyn["mqar_hard"]["num_kv_pairs"]
    assert (sparse_run / "dynamic_activation.png").stat().st_size > 0
    bricks = result["bricks"]
    assert bricks["skills"] == ["text", "mqar", "copy"]
    assert bricks["top5pct_overlap"]["text"]["text"] == 1.0
    assert set(bricks["prune_loss_ratio"]) == {"text", "mqar", "copy", "random"}
    coact = bricks["coactivation_top2_of_8_share"]  # groups fitted on even batches, scored on odd ones
    assert {"clustered", "clustered_fit", "random"} <= set(coact) and coact["clustered"] != coact["clustered_fit"]


@pytest.mark.slow  # default tier kept near 10 min on 2 cores; `make test-slow` runs it
def test_bricks_at_expert_granularity_for_moe(tmp_path):
    workdir = tmp_path / "moe"
    cfg = resolve("smoke", ["model.ffn=moe", "model.d_model=32", "data.seq_len=64", "train.batch_size=4",
                            "train.steps=5", "data.eval_batches=2"])
    train(cfg, workdir, progress=False)
    assert main(["eval", "--workdir", str(workdir), "--analysis", "all"]) == 0
    result = json.loads((workdir / "eval.json").read_text())
    bricks = result["bricks"]
    assert bricks["unit"] == "expert" and bricks["units_per_layer"] == 8 and bricks["top_units_per_layer"] == 1
    assert bricks["top5pct_overlap"]["mqar"]["mqar"] == 1.0 and bricks["coactivation_top2_of_8_share"] is None
    assert all(r > 0 for row in bricks["prune_loss_ratio"].values() for r in row.values())
    assert "skipped" in result["cett"]  # neuron-level only
    dyn = result["dynamic"]  # top-2 routing: every token computes exactly 2 experts' neurons
    assert dyn["unit"] == "expert" and dyn["text"]["mean_active"] == 2 * dyn["neurons_per_unit"]
    assert dyn["mqar_easy"]["mean_active_all_positions"] == dyn["mqar_hard"]["mean_active_all_positions"]


def test_unknown_analysis_is_bad_input(sparse_run, capsys):
    assert main(["eval", "--workdir", str(sparse_run), "--analysis", "cett,nope"]) == 2
    assert "unknown analysis 'nope'; allowed: cett, dynamic, bricks, all" in capsys.readouterr().err


def test_skills_learned_names_learned_and_unlearned_skills():
    from cfm_jax.harness.bricks import skills_learned

    text = skills_learned([{"cell": "a", "mqar/accuracy": 0.9, "copy/accuracy": 0.1},
                           {"cell": "b", "mqar/accuracy": 0.2, "copy/accuracy": None}])
    assert "mqar: learned (mean accuracy >= 0.5) by a; not learned by b 0.20" in text
    assert "copy: learned (mean accuracy >= 0.5) by no model; not learned by a 0.10" in text
