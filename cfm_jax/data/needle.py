"""Needle-in-a-haystack (RULER-style, token level) and passkey retrieval.

A needle is [NEEDLE, key, v_1 .. v_m] (m = data.value_len value tokens) hidden in a haystack of
random filler tokens; at the end, each query [QUERY, key] must be followed by that key's value
tokens, which are the scored positions. Variants (RULER's four):

    niah_single      1 needle, queried
    niah_multikey    data.num_needles needles with distinct keys, one queried (the rest distract)
    niah_multivalue  data.num_values needles share one key; the query answers all values in order
    niah_multiquery  data.num_needles needles, data.num_queries of them queried

Passkey: a filler of one repeated 16-token pattern ("the grass is green ..."), one needle
[NEEDLE, d_1 .. d_k] of k = data.value_len digits (10 digit tokens), then [QUERY] -> the digits.

The queried needle (the first, for multivalue) sits at depth d in [0, 1] of the haystack when a
depth is given (data.needle_depth, or the depth eval sets); other needles are placed uniformly.
`sequence_accuracy` in eval.json is RULER's string_match_all / passkey exact match under teacher
forcing: every scored token of a sequence correct.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from cfm_jax.config import DataConfig
from cfm_jax.data.synthetic import NEEDLE, QUERY, SyntheticTask, distinct, insert_blocks, shift_targets, token_ranges
from cfm_jax.errors import UserError

N_DIGITS = 10
PASSKEY_PATTERN_LEN = 16


def niah_batch(rng, batch: int, length: int, vocab_size: int, n_keys: int, values_per_key: int,
               n_queries: int, value_len: int, depth: float | None) -> tuple[np.ndarray, np.ndarray]:
    """Inputs, labels (batch, length). Needles are (key, value) pairs: n_keys keys x values_per_key."""
    r = token_ranges(vocab_size)
    n_needles = n_keys * values_per_key
    keys = distinct(rng, batch, *r["keys"], n_keys)  # (b, K)
    values = distinct(rng, batch, *r["values"], n_needles * value_len).reshape(batch, n_keys, values_per_key, value_len)
    needle_keys = np.repeat(keys, values_per_key, axis=1)  # (b, n) key of each needle
    blocks = np.concatenate(
        [np.full((batch, n_needles, 1), NEEDLE), needle_keys[..., None], values.reshape(batch, n_needles, value_len)], axis=2
    )
    query_len = n_queries * (2 + values_per_key * value_len)
    n_filler = length + 1 - query_len - n_needles * blocks.shape[2]
    filler = rng.integers(*r["filler"], (batch, n_filler))
    starts = rng.integers(0, n_filler + 1, (batch, n_needles))
    if depth is not None:
        starts[:, 0] = round(depth * n_filler)
    haystack, positions = insert_blocks(filler, blocks, starts)
    # A key's values are answered in their order of appearance in the haystack.
    order = np.argsort(positions.reshape(batch, n_keys, values_per_key), axis=2)
    values = np.take_along_axis(values, order[..., None], axis=2)
    queried = np.argsort(rng.random((batch, n_keys)), axis=1)[:, :n_queries]  # which keys are queried
    if n_queries == 1:
        queried[:, 0] = 0  # the first key: the one placed at `depth`
    q_keys = np.take_along_axis(keys, queried, axis=1)
    q_values = np.take_along_axis(values.reshape(batch, n_keys, -1), queried[..., None], axis=1)  # (b, Q, nv*m)
    query = np.concatenate([np.full((batch, n_queries, 1), QUERY), q_keys[..., None], q_values], axis=2)
    tokens = np.concatenate([haystack, query.reshape(batch, -1)], axis=1)  # (b, length + 1)
    answer = np.zeros(tokens.shape, bool)
    per_query = query.shape[2]
    for q in range(n_queries):  # the value tokens of each query block are scored
        start = haystack.shape[1] + q * per_query + 2
        answer[:, start: start + per_query - 2] = True
    return shift_targets(tokens, answer)


def passkey_batch(rng, batch: int, length: int, vocab_size: int, digits: int, depth: float | None):
    r = token_ranges(vocab_size)
    pattern = np.random.default_rng(0xCAFE).integers(*r["filler"], PASSKEY_PATTERN_LEN)  # fixed "text"
    key = rng.integers(r["values"][0], r["values"][0] + N_DIGITS, (batch, digits))
    blocks = np.concatenate([np.full((batch, 1), NEEDLE), key], axis=1)[:, None, :]
    query = np.concatenate([np.full((batch, 1), QUERY), key], axis=1)
    n_filler = length + 1 - query.shape[1] - blocks.shape[2]
    filler = np.tile(pattern, (batch, n_filler // PASSKEY_PATTERN_LEN + 1))[:, :n_filler]
    starts = rng.integers(0, n_filler + 1, (batch, 1)) if depth is None else np.full((batch, 1), round(depth * n_filler))
    haystack, _ = insert_blocks(filler, blocks, starts)
    tokens = np.concatenate([haystack, query], axis=1)
    answer = np.zeros(tokens.shape, bool)
    answer[:, -digits:] = True
    return shift_targets(tokens, answer)


@dataclass(frozen=True)
class PasskeyConfig(DataConfig):
    value_len: int = 2  # tokens per value (niah_*); digits of the passkey (passkey)
    needle_depth: float = -1.0  # depth in [0, 1] of the queried needle in training sequences; -1 = uniform
    eval_depths: int = 5  # evenly spaced depths evaluated at seq_len (0 or 1 = off)


    def validate_depths(self) -> None:
        if not (self.needle_depth == -1.0 or 0.0 <= self.needle_depth <= 1.0):
            raise UserError(f"data.needle_depth={self.needle_depth} must be in [0, 1] or -1 (uniform)")
        if self.eval_depths < 0:
            raise UserError(f"data.eval_depths={self.eval_depths} must be >= 0")


@dataclass(frozen=True)
class NeedleConfig(PasskeyConfig):
    num_needles: int = 4  # niah_multikey / niah_multiquery: needles (distinct keys) in the haystack
    num_values: int = 4  # niah_multivalue: values stored under the one key
    num_queries: int = 4  # niah_multiquery: needles queried


class _NeedleTask(SyntheticTask):
    has_depth = True
    config_cls = NeedleConfig
    shape: ClassVar[str]  # "single", "multikey", "multivalue", "multiquery"

    @classmethod
    def counts(cls, cfg) -> tuple[int, int, int]:
        """(keys, values per key, queries) for this variant."""
        return {
            "single": (1, 1, 1), "multikey": (cfg.num_needles, 1, 1),
            "multivalue": (1, cfg.num_values, 1), "multiquery": (cfg.num_needles, 1, cfg.num_queries),
        }[cls.shape]

    @classmethod
    def check(cls, cfg, length: int) -> None:
        keys, per_key, queries = cls.counts(cfg)
        if min(keys, per_key, queries, cfg.value_len) < 1 or queries > keys:
            raise UserError(
                f"{cls.name}: needles={keys}, values={per_key}, queries={queries}, value_len={cfg.value_len} "
                "must be >= 1 with queries <= needles"
            )
        needed = keys * per_key * (2 + cfg.value_len) + queries * (2 + per_key * cfg.value_len)
        if needed > length:
            raise UserError(f"{cls.name} needs length >= {needed} for its needles and queries, got {length}")
        r = token_ranges(cfg.vocab_size)
        if keys * per_key * cfg.value_len > r["values"][1] - r["values"][0]:
            raise UserError(f"{cls.name}: data.vocab_size={cfg.vocab_size} is too small for that many value tokens")

    def generate(self, rng, batch, length, depth):
        keys, per_key, queries = self.counts(self.cfg)
        return niah_batch(rng, batch, length, self.vocab_size, keys, per_key, queries, self.cfg.value_len, depth)


class NIAHSingle(_NeedleTask):
    name, shape = "niah_single", "single"


class NIAHMultiKey(_NeedleTask):
    name, shape = "niah_multikey", "multikey"


class NIAHMultiValue(_NeedleTask):
    name, shape = "niah_multivalue", "multivalue"


class NIAHMultiQuery(_NeedleTask):
    name, shape = "niah_multiquery", "multiquery"


class PasskeyTask(SyntheticTask):
    name = "passkey"
    has_depth = True
    config_cls = PasskeyConfig

    @classmethod
    def check(cls, cfg, length: int) -> None:
        if cfg.value_len < 1 or 2 * cfg.value_len + 2 > length:
            raise UserError(f"passkey with data.value_len={cfg.value_len} digits needs length >= {2 * cfg.value_len + 2}, got {length}")

    def generate(self, rng, batch, length, depth):
        return passkey_batch(rng, batch, length, self.vocab_size, self.cfg.value_len, depth)
