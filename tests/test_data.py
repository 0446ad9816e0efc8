"""Data: MQAR structure and determinism, byte text corpus split and batches."""

from __future__ import annotations

import numpy as np
import pytest

from cfm_jax.config import resolve
from cfm_jax.data import IGNORE, make_task
from cfm_jax.data.mqar import mqar_batch
from cfm_jax.data.text import decode, encode, load_corpus
from cfm_jax.errors import UserError


def test_mqar_structure():
    V, L, kv = 64, 48, 6
    inputs, labels = mqar_batch(np.random.default_rng(0), 32, L, V, kv)
    assert inputs.shape == labels.shape == (32, L) and inputs.dtype == np.int32
    for x, y in zip(inputs, labels):
        keys, values = x[0:2 * kv:2], x[1:2 * kv:2]
        assert len(set(keys)) == kv and np.all((keys >= 1) & (keys < V // 2))
        assert np.all((values >= V // 2) & (values < V))
        answer_pos = np.flatnonzero(y != IGNORE)
        assert len(answer_pos) == kv and np.all(answer_pos >= 2 * kv)
        assert sorted(x[answer_pos]) == sorted(keys)  # every key queried exactly once
        lookup = dict(zip(keys, values))
        for p in answer_pos:
            assert y[p] == lookup[x[p]]  # the label after a query key is that key's value
    assert np.all((inputs >= 0) & (inputs < V))


@pytest.mark.parametrize("filler", ["zoology", "nonkey"])
def test_mqar_filler_never_adds_a_key_under_nonkey(filler):
    """nonkey: every key token in a sequence sits at a pair or a query position; zoology's filler
    (the whole vocabulary) puts stray keys elsewhere, about one per sequence at V = 64."""
    V, L, kv = 64, 128, 4
    inputs, labels = mqar_batch(np.random.default_rng(0), 256, L, V, kv, filler=filler)
    stray = 0
    for x, y in zip(inputs, labels):
        bound = set(range(0, 2 * kv, 2)) | set(np.flatnonzero(y != IGNORE))
        is_key = (x >= 1) & (x < V // 2)
        stray += int(np.sum(is_key & ~np.isin(np.arange(L), list(bound))))
    if filler == "nonkey":
        assert stray == 0
        fill = inputs[:, 2 * kv:][labels[:, 2 * kv:] == IGNORE]
        assert np.any(fill == 0) and np.any(fill >= V // 2)  # both non-key ranges are drawn
    else:
        assert stray / len(inputs) > 10  # ~ (L - 3 kv) * (V/2 - 1) / V stray keys per sequence


def test_mqar_unbound_filler_never_repeats_a_bound_key():
    """unbound: a sequence's bound keys occur only at their pair and their query; every other token of
    the vocabulary (other keys, values, 0) is drawn as filler, about uniformly."""
    V, L, kv = 64, 128, 4
    inputs, labels = mqar_batch(np.random.default_rng(1), 256, L, V, kv, filler="unbound")
    counts = np.zeros(V, int)
    for x, y in zip(inputs, labels):
        keys = x[0:2 * kv:2]
        query = np.flatnonzero(y != IGNORE)
        elsewhere = np.setdiff1d(np.arange(2 * kv, L), query)
        assert not np.isin(x[elsewhere], keys).any()
        assert sorted(x[query]) == sorted(keys)  # each key queried once
        np.add.at(counts, x[elsewhere], 1)
    keys_drawn, others = counts[1:V // 2], np.r_[counts[:1], counts[V // 2:]]
    assert np.all(counts > 0)  # every token is filler in some row (keys in rows where they are unbound)
    # about uniform: a key is missing from the rows that bind it (kv of the V/2 - 1 keys per row)
    assert keys_drawn.mean() == pytest.approx(others.mean() * (1 - kv / (V // 2 - 1)), rel=0.1)


def test_mqar_query_gaps_follow_power_law():
    """With a = 0.01 most queries sit close to the start of the query region (short gaps)."""
    _, labels = mqar_batch(np.random.default_rng(1), 256, 512, 1024, 8, power_a=0.01)
    pos = np.nonzero(labels != IGNORE)[1] - 16
    assert np.median(pos) < 100  # uniform placement would give a median near 250


def test_mqar_batches_are_a_function_of_seed_and_step():
    task = make_task(resolve("smoke", ["data.task=mqar"]).data)
    a, b = task.train_batch(0, 5, 4), task.train_batch(0, 5, 4)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["inputs"], task.train_batch(0, 6, 4)["inputs"])
    assert not np.array_equal(a["inputs"], task.train_batch(1, 5, 4)["inputs"])
    sets = task.eval_sets(4)
    assert list(sets) == ["len128", "len256", "len512"]
    assert sets["len256"][0]["inputs"].shape == (4, 256)


def test_mqar_pair_count_mixture_and_per_count_eval_sets():
    """data.train_kv_pairs: rows split ~1/count over the counts (equal answers per count), each row scoring its own count, the
    positions padded with 0 (an unscored position) to the largest; data.eval_kv_pairs: a set per
    length and count, sized by data.eval_answers; a single count draws the same batches as before."""
    cfg = resolve("smoke", ["data.task=mqar", "data.vocab_size=512", "data.seq_len=64", "data.train_kv_pairs=4,8,16",
                            "data.eval_kv_pairs=4,16", "data.eval_lengths=64,128", "data.eval_answers=1000"]).data
    task = make_task(cfg)
    batch = task.train_batch(0, 3, 10)  # 10 rows ~ 1/count -> 6, 3, 1: 24, 24 and 16 answers
    assert list((batch["labels"] != IGNORE).sum(axis=1)) == [4] * 6 + [8] * 3 + [16]
    assert batch["positions"].shape == (10, 16)
    picked = np.take_along_axis(batch["labels"], batch["positions"], axis=1)
    assert list((picked != IGNORE).sum(axis=1)) == [4] * 6 + [8] * 3 + [16]  # every answer, each once
    assert np.all(batch["positions"][:6, :12] == 0) and batch["labels"][0, 0] == IGNORE
    sets = task.eval_sets(8)
    assert {k: len(v) for k, v in sets.items()} == {"len64kv4": 32, "len64kv16": 8, "len128kv4": 32, "len128kv16": 8}
    assert np.all((sets["len128kv16"][0]["labels"] != IGNORE).sum(axis=1) == 16)
    single = make_task(resolve("smoke", ["data.task=mqar", "data.seq_len=64", "data.num_kv_pairs=8"]).data)
    listed = make_task(resolve("smoke", ["data.task=mqar", "data.seq_len=64", "data.train_kv_pairs=8"]).data)
    a, b = single.train_batch(2, 5, 4), listed.train_batch(2, 5, 4)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    for bad, match in (("data.train_kv_pairs=4,4", "distinct"), ("data.eval_kv_pairs=0,4", "distinct"),
                       ("data.train_kv_pairs=4,32", "needs seq_len >= 128"), ("data.eval_answers=-1", "eval_answers")):
        with pytest.raises(UserError, match=match):
            resolve("smoke", ["data.task=mqar", "data.seq_len=64", bad])


def test_mix_task_rows_shares_determinism_and_eval_sets():
    """data.task=mix: text, MQAR and copy rows in the declared shares, each row its generator's
    format, a pure function of (seed, step); eval sets val (text), mqar, copy."""
    cfg = resolve("smoke", ["data.task=mix", "data.seq_len=64", "data.num_kv_pairs=4", "data.mix_weights=2,1,1",
                            "data.eval_batches=2"]).data
    task = make_task(cfg)
    text = make_task(resolve("smoke", ["data.task=text", "data.seq_len=64"]).data)
    assert task.vocab_size == 256
    batch = task.train_batch(3, 7, 10)  # 2:1:1 of 10 rows -> 5 text, 3 mqar, 2 copy (largest remainder)
    np.testing.assert_array_equal(batch["inputs"][:5], text.train_batch(3, 7, 5)["inputs"])
    assert np.all(batch["labels"][:5] != IGNORE)  # text: every position scored
    scored = (batch["labels"] != IGNORE).sum(axis=1)
    assert list(scored[5:8]) == [4, 4, 4]  # mqar: one answer per key-value pair
    assert list(scored[8:]) == [31, 31] and np.all(batch["inputs"][8:, 31] == 0)  # copy: separator, then the copy
    again = task.train_batch(3, 7, 10)
    assert all(np.array_equal(batch[k], again[k]) for k in batch)
    assert not np.array_equal(batch["inputs"][5:], task.train_batch(3, 8, 10)["inputs"][5:])
    sets = task.eval_sets(4)
    assert list(sets) == ["val", "mqar", "copy"] and all(len(v) == 2 for v in sets.values())
    for bad in ("1,1", "0,0,0", "1,-1,1"):
        with pytest.raises(UserError, match="data.mix_weights"):
            resolve("smoke", ["data.task=mix", f"data.mix_weights={bad}"])


def test_mqar_rejects_impossible_settings():
    with pytest.raises(UserError, match="needs seq_len >= 64"):
        mqar_batch(np.random.default_rng(0), 1, 40, 256, 16)
    with pytest.raises(UserError, match="distinct keys"):
        mqar_batch(np.random.default_rng(0), 1, 4096, 64, 40)


def test_byte_tokenizer_round_trip():
    text = "def f(x):\n    return x ** 2  # é ∑"
    tokens = encode(text)
    assert tokens.max() < 256 and decode(tokens) == text


def test_stdlib_corpus_split_is_by_file_and_stable():
    corpus = load_corpus("", 0.05)
    assert corpus.n_files > 100 and len(corpus.train) > 10 * len(corpus.val) > 0
    assert load_corpus.__wrapped__("", 0.05).fingerprint == corpus.fingerprint  # re-read: same bytes
    task = make_task(resolve("smoke").data)
    batch = task.train_batch(0, 3, 4)
    assert np.array_equal(batch["inputs"][:, 1:], batch["labels"][:, :-1])  # next-byte targets
    assert np.array_equal(batch["inputs"], task.train_batch(0, 3, 4)["inputs"])


def test_data_path_directory_and_file(tmp_path):
    for i in range(40):
        (tmp_path / f"doc{i}.txt").write_text(f"document number {i} " * 50)
    (tmp_path / "binary.bin").write_bytes(bytes([0xFF, 0xFE, 0x00]) * 10)  # not UTF-8: skipped
    corpus = load_corpus(str(tmp_path), 0.2)
    assert corpus.n_files == 40 and len(corpus.val) > 0
    single = tmp_path / "doc0.txt"
    corpus = load_corpus(str(single), 0.1)  # one file: split by bytes
    assert len(corpus.train) + len(corpus.val) == single.stat().st_size
    task = make_task(resolve("smoke", [f"data.path={tmp_path}", "data.seq_len=32"]).data)
    assert task.eval_sets(2)["val"][0]["inputs"].shape == (2, 32)


def _shards(directory, n_files=6, docs_per_file=40):
    """JSONL shards of small synthetic documents (a word soup, enough for a BPE to learn merges)."""
    import json as json_

    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "sparse", "neuron", "expert", "router", "token", "value"]
    directory.mkdir()
    for f in range(n_files):
        with open(directory / f"shard{f:02d}.jsonl", "w") as out:
            for d in range(docs_per_file):
                text = " ".join(rng.choice(words, 60)) + f" doc {f}-{d}."
                out.write(json_.dumps({"text": text, "id": d}) + "\n")
    return directory


def test_jsonl_shards_split_by_document(tmp_path):
    shards = _shards(tmp_path / "shards")
    corpus = load_corpus(str(shards), 0.2)
    assert corpus.n_files == 240  # one document per JSONL line
    assert 0 < len(corpus.val) < len(corpus.train)
    globbed = load_corpus(str(shards / "shard0*.jsonl"), 0.2)
    assert globbed.fingerprint == corpus.fingerprint  # the same documents by glob
    (shards / "bad.jsonl").write_text("not json\n")
    with pytest.raises(UserError, match="line 1 is not a JSON object"):
        load_corpus.__wrapped__(str(shards), 0.2)


def test_bpe_tokenizer_trains_caches_and_reports_bits_per_byte(tmp_path, monkeypatch):
    """data.tokenizer=bpe:512 on JSONL shards: trained on the training split, cached (a second task
    reads the cache), windows of token ids < vocabulary, held-out bytes per token > 1 (merges), and a
    smoke run reports bits per byte = loss / ln 2 / bytes per token."""
    pytest.importorskip("tokenizers")
    import json as json_
    import math

    from cfm_jax.harness.evaluate import evaluate
    from cfm_jax.train import train

    monkeypatch.setenv("CFM_JAX_CACHE", str(tmp_path / "cache"))
    shards = _shards(tmp_path / "shards")
    overrides = [f"data.path={shards}", "data.tokenizer=bpe:512", "data.seq_len=32", "data.val_fraction=0.2"]
    task = make_task(resolve("smoke", overrides).data)
    assert task.tokenizer_info["cache_hit"] is False and 260 <= task.vocab_size <= 512
    assert task.bytes_per_token > 1.5
    batch = task.train_batch(0, 0, 4)
    assert batch["inputs"].shape == (4, 32) and batch["inputs"].max() < task.vocab_size
    again = make_task(resolve("smoke", overrides).data)
    assert again.tokenizer_info["cache_hit"] is True
    np.testing.assert_array_equal(again.train_batch(0, 0, 4)["inputs"], batch["inputs"])
    w = tmp_path / "w"
    train(resolve("smoke", [*overrides, "train.steps=3", "model.d_model=32"]), w, progress=False)
    result = evaluate(w)
    val = result["sets"]["val"]
    assert val["bits_per_byte"] == pytest.approx(val["loss"] / math.log(2) / task.bytes_per_token)
    assert result["corpus"]["tokenizer"] == "bpe:512" and result["corpus"]["cache_hit"] is True
    assert json_.loads((w / "config.json").read_text())["config"]["data"]["tokenizer"] == "bpe:512"
    with pytest.raises(UserError, match="data.tokenizer='bpe:x' must be bytes, bpe:N"):
        resolve("smoke", ["data.tokenizer=bpe:x"])


def test_parquet_shards_are_documents(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    (tmp_path / "p").mkdir()
    for i in range(3):
        pq.write_table(pa.table({"text": [f"document {i}-{j} " * 20 for j in range(10)], "id": list(range(10))}),
                       tmp_path / "p" / f"part{i}.parquet")
    corpus = load_corpus(str(tmp_path / "p"), 0.2)
    assert corpus.n_files == 30 and 0 < len(corpus.val) < len(corpus.train)


def test_saved_huggingface_dataset_is_read_from_disk(tmp_path):
    """A DatasetDict saved with save_to_disk: every split's "text" rows are documents (no download)."""
    datasets = pytest.importorskip("datasets")

    splits = {"train": [f"row {i} " * 15 for i in range(40)], "test": [f"other {i} " * 15 for i in range(10)]}
    datasets.DatasetDict({k: datasets.Dataset.from_dict({"text": v}) for k, v in splits.items()}).save_to_disk(tmp_path / "ds")
    corpus = load_corpus(str(tmp_path / "ds"), 0.2)
    assert corpus.n_files == 50 and 0 < len(corpus.val) < len(corpus.train)


def test_glob_paths_split_the_same_from_any_folder(tmp_path, monkeypatch):
    """Documents are named from the pattern's literal root, so the split (and the fingerprint) do not
    depend on the working folder or on a relative vs absolute pattern; ? and [] globs work too."""
    (tmp_path / "data").mkdir()
    shards = _shards(tmp_path / "data" / "a")
    absolute = load_corpus.__wrapped__(str(tmp_path / "data" / "*" / "shard*.jsonl"), 0.2)
    monkeypatch.chdir(tmp_path)
    relative = load_corpus.__wrapped__("data/*/shard*.jsonl", 0.2)
    assert relative.fingerprint == absolute.fingerprint and relative.n_files == 240
    assert load_corpus.__wrapped__(str(shards / "shard0?.jsonl"), 0.2).n_files == 240
    resolve("smoke", [f"data.path={shards}/shard0[0-5].jsonl"])  # a glob passes validation


def test_token_cache_is_keyed_by_the_split(tmp_path, monkeypatch):
    """One text file is split by bytes: the same bytes (fingerprint) at any val_fraction, but another
    split, so another cache entry."""
    pytest.importorskip("tokenizers")
    monkeypatch.setenv("CFM_JAX_CACHE", str(tmp_path / "cache"))
    book = tmp_path / "book.txt"
    book.write_text(" ".join(f"word{i % 97}" for i in range(20000)))
    tasks = [make_task(resolve("smoke", [f"data.path={book}", "data.tokenizer=bpe:300", "data.seq_len=32",
                                         f"data.val_fraction={v}"]).data) for v in (0.05, 0.2)]
    assert tasks[0].corpus.fingerprint == tasks[1].corpus.fingerprint
    assert not tasks[1].tokenizer_info["cache_hit"] and tasks[0].tokenizer_info["cache"] != tasks[1].tokenizer_info["cache"]
    assert len(tasks[1].val_tokens) > 2 * len(tasks[0].val_tokens)
