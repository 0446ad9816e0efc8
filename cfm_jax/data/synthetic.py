"""Shared machinery of the synthetic long-context tasks: token layout, insertion of blocks into a
haystack, and the Task base class that turns a generator into train batches and eval sets.

Token layout for a vocabulary of V tokens (V >= 64):

    0..15                 specials (PAD, SEP, QUERY, NEEDLE, VAR, EQ, BLANK, MARKER, unused)
    [16, 16 + s)          keys / variable names          s = (V - 16) // 3
    [16 + s, 16 + 2s)     values / passkey digits / content tokens
    [16 + 2s, V)          filler (haystack noise)

A generator returns (inputs, labels), both (batch, length) int32, with labels[t] the target at
position t and IGNORE where nothing is scored.
"""

from __future__ import annotations

import abc
from typing import ClassVar

import numpy as np

from cfm_jax.data.base import EVAL_STREAM, IGNORE, Task
from cfm_jax.errors import UserError

PAD, SEP, QUERY, NEEDLE, VAR, EQ, BLANK, MARKER = range(8)
N_SPECIAL = 16
MIN_VOCAB = 64


def token_ranges(vocab_size: int) -> dict[str, tuple[int, int]]:
    span = (vocab_size - N_SPECIAL) // 3
    lo = N_SPECIAL
    return {"keys": (lo, lo + span), "values": (lo + span, lo + 2 * span), "filler": (lo + 2 * span, vocab_size)}


def distinct(rng: np.random.Generator, batch: int, low: int, high: int, k: int) -> np.ndarray:
    """k distinct ints from [low, high) per row: (batch, k)."""
    if k > high - low:
        raise UserError(f"cannot draw {k} distinct tokens from a range of {high - low}; raise data.vocab_size")
    return np.argsort(rng.random((batch, high - low)), axis=1)[:, :k] + low


def insert_blocks(haystack: np.ndarray, blocks: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Insert n equal-length blocks into a haystack without overlap, keeping haystack order.

    haystack: (batch, F) filler; blocks: (batch, n, m); starts: (batch, n) insertion points in
    [0, F] counted in filler tokens (equal points keep block order). Returns (sequence (batch,
    F + n*m), block_positions (batch, n) where each block starts in the sequence).
    """
    b, n, m = blocks.shape
    order = np.argsort(starts, axis=1, kind="stable")  # rank -> block
    sorted_starts = np.take_along_axis(starts, order, axis=1)
    positions_by_rank = sorted_starts + np.arange(n) * m
    positions = np.empty_like(positions_by_rank)
    np.put_along_axis(positions, order, positions_by_rank, axis=1)
    total = haystack.shape[1] + n * m
    is_block = np.zeros((b, total), bool)
    idx = (positions[:, :, None] + np.arange(m)).reshape(b, -1)
    np.put_along_axis(is_block, idx, True, axis=1)
    out = np.empty((b, total), haystack.dtype)
    out[~is_block] = haystack.reshape(-1)  # row-major: each row's filler in order
    np.put_along_axis(out, idx, blocks.reshape(b, -1), axis=1)
    return out, positions


def shift_targets(tokens: np.ndarray, answer: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """tokens (batch, L+1), answer mask (batch, L+1) over tokens to predict -> inputs, labels (batch, L)."""
    labels = np.where(answer[:, 1:], tokens[:, 1:], IGNORE)
    return tokens[:, :-1].astype(np.int32), labels.astype(np.int32)


class SyntheticTask(Task):
    """A task defined by `generate(rng, batch, length, depth)`; eval sets per length (and depth)."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.vocab_size = cfg.vocab_size

    @classmethod
    def check(cls, cfg, length: int) -> None:
        """Raise UserError if this task cannot be generated at `length` with `cfg`."""

    @classmethod
    def validate(cls, cfg) -> None:
        if cfg.vocab_size < MIN_VOCAB:
            raise UserError(f"data.vocab_size={cfg.vocab_size} must be >= {MIN_VOCAB} for data.task={cls.name}")
        if cls.has_depth:
            cfg.validate_depths()
        for length in (cfg.seq_len, *cfg.lengths()):
            cls.check(cfg, length)

    @abc.abstractmethod
    def generate(self, rng: np.random.Generator, batch: int, length: int, depth: float | None):
        """(inputs, labels): (batch, length) int32 each; depth in [0, 1] or None (task's choice)."""

    def train_batch(self, seed: int, step: int, batch_size: int) -> dict[str, np.ndarray]:
        depth = self.cfg.needle_depth if self.has_depth and self.cfg.needle_depth >= 0 else None
        inputs, labels = self.generate(np.random.default_rng((seed, step)), batch_size, self.cfg.seq_len, depth)
        return {"inputs": inputs, "labels": labels}

    def eval_sets(self, batch_size: int) -> dict[str, list[dict[str, np.ndarray]]]:
        """`lenL` per length in data.lengths() (random depth), and for needle tasks `lenL_depthD`
        at the training length for data.eval_depths evenly spaced depths D (percent)."""
        specs = [(f"len{length}", length, None) for length in self.cfg.lengths()]
        if self.has_depth and self.cfg.eval_depths > 1:  # needle tasks' PasskeyConfig field
            for d in np.linspace(0.0, 1.0, self.cfg.eval_depths):
                specs.append((f"len{self.cfg.seq_len}_depth{round(100 * d)}", self.cfg.seq_len, float(d)))
        sets = {}
        for name, length, depth in specs:
            batches = []
            for i in range(self.cfg.eval_batches):
                rng = np.random.default_rng((EVAL_STREAM, length, 1001 if depth is None else round(1000 * depth), i))
                inputs, labels = self.generate(rng, batch_size, length, depth)
                batches.append({"inputs": inputs, "labels": labels})
            sets[name] = batches
        return sets
