"""Selective copying (Mamba, MAD) and copying (Jelassi et al., "Repeat after me").

Selective copying: data.num_targets content tokens at random positions of a BLANK region, then as
many MARKER tokens; at the i-th marker the model must output the i-th content token (scored at the
markers, no teacher forcing of the content). Content tokens come from the first data.content_vocab
value tokens (Mamba: 16).

Copying: a random string, SEP, then the same string again (scored), PAD to the length. Training
strings have lengths uniform in [data.copy_min_len, data.copy_max_len] (clipped to fit); at an eval
length L the string fills the context, (L - 1) // 2 tokens, so longer eval lengths copy longer strings.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cfm_jax.config import DataConfig
from cfm_jax.data.base import IGNORE
from cfm_jax.data.synthetic import BLANK, MARKER, PAD, SEP, SyntheticTask, shift_targets, token_ranges
from cfm_jax.errors import UserError


def selective_copying_batch(rng, batch: int, length: int, vocab_size: int, num_targets: int, content_vocab: int):
    lo = token_ranges(vocab_size)["values"][0]
    region = length - num_targets
    content = rng.integers(lo, lo + content_vocab, (batch, num_targets))
    positions = np.sort(np.argsort(rng.random((batch, region)), axis=1)[:, :num_targets], axis=1)
    inputs = np.full((batch, length), BLANK, np.int64)
    np.put_along_axis(inputs, positions, content, axis=1)
    inputs[:, region:] = MARKER
    labels = np.full((batch, length), IGNORE, np.int64)
    labels[:, region:] = content
    return inputs.astype(np.int32), labels.astype(np.int32)


def copying_batch(rng, batch: int, length: int, vocab_size: int, lengths: np.ndarray):
    """lengths: (batch,) string lengths, each <= (length - 1) // 2."""
    lo, hi = token_ranges(vocab_size)["values"]
    n_max = (length - 1) // 2
    body = rng.integers(lo, hi, (batch, n_max))
    pos = np.arange(length + 1)[None, :]
    n = lengths[:, None]
    first = pos < n
    second = (pos > n) & (pos <= 2 * n)
    src_second = np.clip(pos - n - 1, 0, n_max - 1)
    tokens = np.where(first, np.take_along_axis(body, np.clip(pos, 0, n_max - 1), axis=1), PAD)
    tokens = np.where(pos == n, SEP, tokens)
    tokens = np.where(second, np.take_along_axis(body, np.broadcast_to(src_second, tokens.shape), axis=1), tokens)
    return shift_targets(tokens, second)


@dataclass(frozen=True)
class SelectiveCopyingConfig(DataConfig):
    num_targets: int = 16  # content tokens to copy
    content_vocab: int = 16  # distinct content tokens


@dataclass(frozen=True)
class CopyingConfig(DataConfig):
    copy_min_len: int = 8  # shortest training string
    copy_max_len: int = 50  # longest training string (clipped to (seq_len - 1) // 2)


class SelectiveCopyingTask(SyntheticTask):
    name = "selective_copying"
    config_cls = SelectiveCopyingConfig

    @classmethod
    def check(cls, cfg, length: int) -> None:
        if cfg.num_targets < 1 or 2 * cfg.num_targets > length:
            raise UserError(f"selective_copying with data.num_targets={cfg.num_targets} needs length >= {2 * cfg.num_targets}, got {length}")
        r = token_ranges(cfg.vocab_size)["values"]
        if not 1 <= cfg.content_vocab <= r[1] - r[0]:
            raise UserError(f"data.content_vocab={cfg.content_vocab} must be in [1, {r[1] - r[0]}]")

    def generate(self, rng, batch, length, depth):
        return selective_copying_batch(rng, batch, length, self.vocab_size, self.cfg.num_targets, self.cfg.content_vocab)


class CopyingTask(SyntheticTask):
    name = "copying"
    config_cls = CopyingConfig

    @classmethod
    def check(cls, cfg, length: int) -> None:
        if not 1 <= cfg.copy_min_len <= cfg.copy_max_len:
            raise UserError(f"need 1 <= data.copy_min_len={cfg.copy_min_len} <= data.copy_max_len={cfg.copy_max_len}")
        if length < 3:
            raise UserError(f"copying needs length >= 3, got {length}")

    def generate(self, rng, batch, length, depth):
        n_max = (length - 1) // 2
        if length == self.cfg.seq_len:  # training distribution: variable lengths
            lo, hi = min(self.cfg.copy_min_len, n_max), min(self.cfg.copy_max_len, n_max)
            lengths = rng.integers(lo, hi + 1, batch)
        else:  # eval at another length: the string fills the context
            lengths = np.full(batch, n_max)
        return copying_batch(rng, batch, length, self.vocab_size, lengths)


def repeat_copy_batch(rng: np.random.Generator, batch: int, seq_len: int, vocab_size: int) -> dict:
    """[random string of length (seq_len-1)//2] [separator 0] [the string again]; the copy is scored.
    The `copy` skill of the bricks analysis and of `data.task=mix`. -> inputs, labels (batch, seq_len)."""
    n = (seq_len - 1) // 2
    body = rng.integers(1, vocab_size, (batch, n))
    tokens = np.concatenate([body, np.zeros((batch, 1), np.int64), body, np.zeros((batch, seq_len + 1 - 2 * n - 1), np.int64)], 1)
    labels = np.full((batch, seq_len), IGNORE, np.int64)
    labels[:, n: 2 * n] = tokens[:, n + 1: 2 * n + 1]  # after the separator, predict the copy
    return {"inputs": tokens[:, :seq_len].astype(np.int32), "labels": labels.astype(np.int32)}
