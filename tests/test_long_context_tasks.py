"""Long-context task generators: every label is recoverable from the sequence, knobs are honoured,
impossible settings are rejected, batches are a function of (seed, step)."""

from __future__ import annotations

import numpy as np
import pytest

from cfm_jax.config import resolve
from cfm_jax.data import IGNORE, make_task
from cfm_jax.data.synthetic import BLANK, EQ, MARKER, NEEDLE, QUERY, SEP, VAR, insert_blocks
from cfm_jax.errors import UserError

V = 256


def batch(task: str, *overrides: str, length: int = 128, seed: int = 0, n: int = 8):
    cfg = resolve("smoke", [f"data.task={task}", f"data.seq_len={length}", f"data.vocab_size={V}", *overrides])
    out = make_task(cfg.data).train_batch(seed, 3, n)
    assert out["inputs"].shape == out["labels"].shape == (n, length)
    assert out["inputs"].dtype == np.int32 and out["inputs"].min() >= 0 and out["inputs"].max() < V
    return out["inputs"], out["labels"]


def full_sequence(x, y):
    """Inputs plus the last target: the sequence the labels were cut from."""
    last = y[-1] if y[-1] != IGNORE else -1
    return list(x) + [last]


def needles_of(seq, value_len):
    """[(position, key, values)] of every needle block in order of appearance."""
    return [(i, seq[i + 1], seq[i + 2: i + 2 + value_len]) for i, t in enumerate(seq) if t == NEEDLE]


def test_insert_blocks_keeps_order_and_never_overlaps():
    filler = np.arange(100, 110)[None]  # 10 filler tokens
    blocks = np.array([[[1, 1], [2, 2], [3, 3]]])
    seq, pos = insert_blocks(filler, blocks, np.array([[5, 0, 5]]))
    assert seq.shape == (1, 16)
    assert [int(t) for t in seq[0] if t >= 100] == list(range(100, 110))  # filler order kept
    assert pos.tolist() == [[7, 0, 9]] and seq[0, 7:9].tolist() == [1, 1] and seq[0, 9:11].tolist() == [3, 3]


@pytest.mark.parametrize("task,n_queries", [("niah_single", 1), ("niah_multikey", 1), ("niah_multivalue", 1),
                                            ("niah_multiquery", 4)])
def test_niah_answers_are_the_needles_values(task, n_queries):
    x, y = batch(task, "data.value_len=3")
    for xi, yi in zip(x, y):
        seq = full_sequence(xi, yi)
        needles = needles_of(seq, 3)
        expected_needles = {"niah_single": 1, "niah_multikey": 4, "niah_multivalue": 4, "niah_multiquery": 4}[task]
        assert len(needles) == expected_needles
        queries = [i for i, t in enumerate(seq) if t == QUERY]
        assert len(queries) == n_queries
        for q in queries:
            key = seq[q + 1]
            answer = [v for (_, k, vals) in needles if k == key for v in vals]  # in order of appearance
            assert answer, "the queried key has a needle"
            assert list(yi[q + 1: q + 1 + len(answer)]) == answer  # scored after the query key
        assert int(np.sum(yi != IGNORE)) == sum(len([v for n in needles if n[1] == seq[q + 1] for v in n[2]]) for q in queries)


def test_needle_depth_places_the_queried_needle():
    for depth, check in ((0.0, lambda p: p == 0), (1.0, lambda p: p > 100)):
        x, y = batch("niah_multikey", f"data.needle_depth={depth}")
        for xi, yi in zip(x, y):
            seq = full_sequence(xi, yi)
            key = seq[[i for i, t in enumerate(seq) if t == QUERY][0] + 1]
            position = [p for p, k, _ in needles_of(seq, 2) if k == key][0]
            assert check(position)


def test_passkey():
    x, y = batch("passkey", "data.value_len=5")
    for xi, yi in zip(x, y):
        seq = full_sequence(xi, yi)
        (p, *_), = needles_of(seq, 5)
        digits = seq[p + 1: p + 6]
        assert list(yi[-5:]) == digits and int(np.sum(yi != IGNORE)) == 5 and xi[-5] == QUERY


def test_variable_tracking_answers_resolve_to_the_value():
    x, y = batch("variable_tracking", "data.num_chains=2", "data.num_hops=3")
    for xi, yi in zip(x, y):
        seq = full_sequence(xi, yi)
        binding = {seq[i + 1]: seq[i + 3] for i, t in enumerate(seq[:-3]) if t == VAR and seq[i + 2] == EQ}
        assert len(binding) == 2 * 4
        q = [i for i, t in enumerate(seq) if t == QUERY][-1]
        value, names = seq[q + 1], [int(t) for t in yi if t != IGNORE]
        assert len(names) == 4
        for name in names:  # every answered name resolves to the queried value through the chain
            v = binding[name]
            while v in binding:
                v = binding[v]
            assert v == value
        assert len([n for n in binding if _resolve(binding, n) == value]) == 4  # and no other name does


def _resolve(binding, name):
    v = binding[name]
    while v in binding:
        v = binding[v]
    return v


def test_selective_copying():
    x, y = batch("selective_copying", "data.num_targets=8")
    for xi, yi in zip(x, y):
        content = [int(t) for t in xi if t not in (BLANK, MARKER)]
        assert len(content) == 8 and list(xi[-8:]) == [MARKER] * 8
        assert [int(t) for t in yi[-8:]] == content and int(np.sum(yi != IGNORE)) == 8


def test_copying_trains_on_variable_lengths_and_evaluates_full_length():
    x, y = batch("copying", "data.copy_min_len=5", "data.copy_max_len=20")
    lengths = []
    for xi, yi in zip(x, y):
        n = list(xi).index(SEP)
        lengths.append(n)
        assert 5 <= n <= 20 and list(yi[n: 2 * n]) == list(xi[:n])
    assert len(set(lengths)) > 1
    cfg = resolve("smoke", ["data.task=copying", "data.seq_len=64", f"data.vocab_size={V}", "data.eval_lengths=64,129"])
    long = make_task(cfg.data).eval_sets(2)["len129"][0]
    assert int(np.sum(long["labels"][0] != IGNORE)) == 64  # (129 - 1) // 2


def test_eval_sets_include_depths_for_needle_tasks():
    cfg = resolve("smoke", ["data.task=passkey", "data.seq_len=64", "data.eval_depths=3"])
    assert list(make_task(cfg.data).eval_sets(2)) == ["len64", "len128", "len256", "len64_depth0", "len64_depth50", "len64_depth100"]


def test_generators_are_deterministic():
    for task in ("niah_multiquery", "variable_tracking", "selective_copying", "copying", "passkey"):
        a, b = batch(task, seed=1), batch(task, seed=1)
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
        assert not np.array_equal(a[0], batch(task, seed=2)[0])


@pytest.mark.parametrize("overrides,fragment", [
    (["data.task=niah_multikey", "data.num_needles=40", "data.seq_len=64"], "needs length >= "),
    (["data.task=niah_multiquery", "data.num_queries=9"], "queries <= needles"),
    (["data.task=variable_tracking", "data.num_hops=40", "data.seq_len=64"], "needs length >= "),
    (["data.task=selective_copying", "data.num_targets=100", "data.seq_len=64"], "needs length >= 200"),
    (["data.task=passkey", "data.needle_depth=1.5"], "must be in [0, 1] or -1"),
    (["data.task=copying", "data.copy_min_len=30", "data.copy_max_len=10"], "copy_min_len=30 <= data.copy_max_len=10"),
    (["data.task=niah_single", "data.vocab_size=32"], "must be >= 64"),
])
def test_impossible_settings_are_rejected(overrides, fragment):
    with pytest.raises(UserError) as info:
        resolve("smoke", overrides)
    assert fragment in str(info.value) and "\n" not in str(info.value)
