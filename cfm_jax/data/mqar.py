"""Multi-query associative recall (Zoology, Arora et al. 2023), vectorized and deterministic.

A sequence opens with `num_kv_pairs` key-value pairs (k1 v1 k2 v2 ...; keys drawn without replacement
from [1, V/2), values from [V/2, V)); every key is then queried once, at a gap drawn from the power
law p(g) ~ g^(a-1); the token after a query key must be its value. Only those answer positions are
labelled. Other positions hold random tokens: from the whole vocabulary (filler="zoology", Zoology's
`random_non_queries`: a bound key can then recur where it is neither bound nor queried), from the
whole vocabulary less the sequence's bound keys (filler="unbound": a bound key occurs only where it
is bound or queried), or from the non-key tokens only (filler="nonkey": 0 and the value range).
Measured (experiments/mqar_capacity.py): a 2-layer attention model learns "zoology" and "unbound"
equally fast, but "nonkey" (and filler from one half of the vocabulary, either half) far more slowly.

    inputs, labels = mqar_batch(np.random.default_rng(0), batch=4, seq_len=64, vocab_size=256,
                                num_kv_pairs=4)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from cfm_jax.config import DataConfig
from cfm_jax.data.base import EVAL_STREAM, IGNORE, Task
from cfm_jax.errors import UserError


def check_mqar(seq_len: int, vocab_size: int, num_kv_pairs: int, power_a: float) -> None:
    if vocab_size < 4 or vocab_size % 2:
        raise UserError(f"data.vocab_size={vocab_size} must be even and >= 4 for mqar")
    if num_kv_pairs > vocab_size // 2 - 1:
        raise UserError(
            f"data.num_kv_pairs={num_kv_pairs} needs distinct keys: at most vocab_size/2 - 1 = {vocab_size // 2 - 1}"
        )
    if (seq_len - 2 * num_kv_pairs) // 2 < num_kv_pairs:
        raise UserError(
            f"mqar with num_kv_pairs={num_kv_pairs} needs seq_len >= {4 * num_kv_pairs}, got {seq_len}"
        )
    if not power_a > 0:
        raise UserError(f"data.power_a={power_a} must be > 0")


def _distinct(rng: np.random.Generator, batch: int, low: int, high: int, k: int) -> np.ndarray:
    """k distinct ints from [low, high) per row: (batch, k)."""
    return np.argsort(rng.random((batch, high - low)), axis=1)[:, :k] + low


FILLERS = ("zoology", "nonkey", "unbound")


def mqar_batch(
    rng: np.random.Generator, batch: int, seq_len: int, vocab_size: int, num_kv_pairs: int, power_a: float = 0.01,
    filler: str = "zoology",
) -> tuple[np.ndarray, np.ndarray]:
    """Returns inputs, labels: (batch, seq_len) int32; labels are IGNORE except at answer positions."""
    check_mqar(seq_len, vocab_size, num_kv_pairs, power_a)
    kv, half = num_kv_pairs, vocab_size // 2
    context = 2 * kv
    keys = _distinct(rng, batch, 1, half, kv)
    values = _distinct(rng, batch, half, vocab_size, kv)
    kvs = np.empty((batch, context), np.int64)
    kvs[:, 0::2], kvs[:, 1::2] = keys, values

    # Query gaps: kv distinct slots from range(space) weighted by a*g^(a-1) (Gumbel top-k sampling).
    space = (seq_len - context) // 2
    log_p = np.log(power_a) + (power_a - 1) * np.log(np.arange(1, space + 1))
    gumbel = -np.log(-np.log(rng.random((batch, space))))
    gaps = np.argsort(-(log_p + gumbel), axis=1)[:, :kv]

    queries = np.zeros((batch, seq_len - context + 1), np.int64)
    np.put_along_axis(queries, 2 * gaps, keys, axis=1)
    examples = np.concatenate([kvs, queries], axis=1)  # (batch, seq_len + 1)
    targets = np.full((batch, seq_len + 1), IGNORE, np.int64)
    np.put_along_axis(targets, 2 * gaps + context + 1, values, axis=1)
    inputs, labels = examples[:, :-1], targets[:, 1:]
    if filler == "zoology":
        fill = rng.integers(0, vocab_size, inputs.shape)
    elif filler == "nonkey":  # uniform over {0} and [half, vocab): index 0 -> token 0, i -> half + i - 1
        fill = rng.integers(0, vocab_size - half + 1, inputs.shape)
        fill = np.where(fill == 0, 0, half + fill - 1)
    elif filler == "unbound":  # uniform over the vocabulary less this sequence's kv bound keys
        fill = rng.integers(0, vocab_size - kv, inputs.shape)
        for key in np.sort(keys, axis=1).T:  # the u-th token of the complement: step over each smaller key
            fill = fill + (fill >= key[:, None])
    else:
        raise ValueError(f"filler={filler!r}; allowed: {', '.join(FILLERS)}")
    inputs = np.where(inputs == 0, fill, inputs)
    return inputs.astype(np.int32), labels.astype(np.int32)


@dataclass(frozen=True)
class MQARConfig(DataConfig):
    num_kv_pairs: int = 8  # key-value pairs per sequence
    power_a: float = 0.01  # query gap distribution p(g) ~ g^(a-1) (Zoology's default)
    # Tokens between pairs and queries. zoology = uniform over the whole vocabulary (Zoology's
    # random_non_queries: ~one stray copy of a bound key per sequence at a small vocabulary); unbound =
    # the whole vocabulary less the sequence's bound keys (no stray bound key); nonkey = 0 and the value range
    mqar_filler: Literal["zoology", "nonkey", "unbound"] = "zoology"
    # Based's protocol (Arora et al. 2024): one model trained on several pair counts, scored per count.
    train_kv_pairs: tuple[int, ...] = ()  # train on these pair counts, rows ~ 1/count (equal answers each); () = num_kv_pairs
    eval_kv_pairs: tuple[int, ...] = ()  # one eval set per count and length, named lenLkvK; () = num_kv_pairs, named lenL
    eval_answers: int = 0  # each eval set holds >= this many answers (10,000: accuracy within +-0.01); 0 = eval_batches


def probe_settings(data_cfg: DataConfig) -> MQARConfig:
    """MQAR settings for probing a trained model: its own (data.num_kv_pairs, power_a, ...) when it
    trained on MQAR rows (mqar, mix), else MQAR's defaults."""
    return data_cfg if isinstance(data_cfg, MQARConfig) else MQARConfig()


class MQARTask(Task):
    name = "mqar"
    config_cls = MQARConfig

    def __init__(self, cfg):
        super().__init__(cfg)
        self.vocab_size = cfg.vocab_size

    @classmethod
    def validate(cls, cfg) -> None:
        for name, counts in (("train_kv_pairs", cfg.train_kv_pairs), ("eval_kv_pairs", cfg.eval_kv_pairs)):
            if counts and (len(set(counts)) != len(counts) or min(counts) < 1):
                raise UserError(f"data.{name}={counts} must be distinct pair counts >= 1 (() = data.num_kv_pairs)")
        if cfg.eval_answers < 0:
            raise UserError(f"data.eval_answers={cfg.eval_answers} must be >= 0 (0 = data.eval_batches batches)")
        for kv in cfg.train_kv_pairs or (cfg.num_kv_pairs,):
            check_mqar(cfg.seq_len, cfg.vocab_size, kv, cfg.power_a)
        for length in cfg.lengths():
            for kv in cfg.eval_kv_pairs or (cfg.num_kv_pairs,):
                check_mqar(length, cfg.vocab_size, kv, cfg.power_a)

    def _batch(self, rng, batch_size: int, seq_len: int, kv: int | None = None) -> dict[str, np.ndarray]:
        c = self.cfg
        inputs, labels = mqar_batch(rng, batch_size, seq_len, c.vocab_size, kv or c.num_kv_pairs, c.power_a, c.mqar_filler)
        return {"inputs": inputs, "labels": labels}

    def train_batch(self, seed: int, step: int, batch_size: int) -> dict[str, np.ndarray]:
        """inputs, labels and "positions" (batch, max pair count): the scored positions, in order, so
        training computes the output head only there. A row with fewer pairs than the most (with
        data.train_kv_pairs) pads its positions with 0, which is never scored (its label is IGNORE)."""
        rng = np.random.default_rng((seed, step))
        counts = self.cfg.train_kv_pairs or (self.cfg.num_kv_pairs,)
        parts = [self._batch(rng, rows, self.cfg.seq_len, kv) for kv, rows in zip(counts, rows_per_count(batch_size, counts)) if rows]
        batch = {k: np.concatenate([p[k] for p in parts]) for k in ("inputs", "labels")}
        return with_positions(batch, max(counts))

    def eval_sets(self, batch_size: int) -> dict[str, list[dict[str, np.ndarray]]]:
        """One set per context length in data.eval_lengths (default: seq_len, 2x, 4x), named lenL, or
        with data.eval_kv_pairs one per length and pair count, named lenLkvK."""
        c, out = self.cfg, {}
        for length in c.lengths():
            for kv in c.eval_kv_pairs or (c.num_kv_pairs,):
                batches = max(c.eval_batches, -(-c.eval_answers // (batch_size * kv)))
                name = f"len{length}kv{kv}" if c.eval_kv_pairs else f"len{length}"
                stream = (EVAL_STREAM, length, kv) if c.eval_kv_pairs else (EVAL_STREAM, length)
                out[name] = [with_positions(self._batch(np.random.default_rng((*stream, i)), batch_size, length, kv), kv)
                             for i in range(batches)]
        return out


def with_positions(batch: dict[str, np.ndarray], most: int) -> dict[str, np.ndarray]:
    """Adds "positions" (batch, most): each row's scored (answer) positions in order, padded with 0,
    which is never scored (its label is IGNORE), so training and evaluation compute the output head
    only there (the head is most of the compute at a large vocabulary)."""
    scored = batch["labels"] != IGNORE  # each row scores exactly its own pair count
    first = np.argsort(~scored, axis=1, kind="stable")[:, :most]  # scored positions first, in order
    positions = np.sort(np.where(np.take_along_axis(scored, first, axis=1), first, 0), axis=1)
    return {**batch, "positions": positions.astype(np.int32)}


def rows_per_count(batch: int, counts: tuple[int, ...]) -> list[int]:
    """Rows of each pair count such that every count contributes about the same number of answers:
    rows proportional to 1 / count, by largest remainder, at least one row each (when batch allows).
    rows_per_count(64, (4, 8, 12, 16)) = [31, 15, 10, 8]."""
    exact = [batch * (1 / k) / sum(1 / c for c in counts) for k in counts]
    rows = [max(int(x), 1 if batch >= len(counts) else 0) for x in exact]
    for i in sorted(range(len(counts)), key=lambda i: rows[i] - exact[i])[: max(0, batch - sum(rows))]:
        rows[i] += 1
    while sum(rows) > batch:  # the minimum of one row overshot: take from the largest
        rows[rows.index(max(rows))] -= 1
    return rows
