"""Text: corpus loading, a document-level split, and the tokenizer (bytes by default, or a BPE).

The embedded default corpus is the running interpreter's standard-library `.py` sources (present on
every machine, no download). `data.path` points at your own data instead: a UTF-8 file, a directory or
a glob of text, JSONL (a "text" field per line) or Parquet (a "text" column) shards, or a Hugging Face
dataset saved with `save_to_disk` (cfm_jax.data.corpora). Documents go to validation by a hash of
their name (file path, plus the line or row), so the split never depends on read order.

`data.tokenizer`: `bytes` (one token per byte, vocabulary 256), `bpe:N` (a byte-level BPE of N tokens
trained on the training split) or a path to a `tokenizer.json` (cfm_jax.data.tokenize, cached).
Bits per byte stay comparable across tokenizers: loss per token / ln 2 / (validation bytes per token).
"""

from __future__ import annotations

import functools
import os
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from cfm_jax.config import DataConfig
from cfm_jax.data.base import Task
from cfm_jax.errors import UserError

VOCAB_SIZE = 256
DOC_SEPARATOR = b"\x00"  # between files, so no window silently spans two documents unmarked


def encode(text: str) -> np.ndarray:
    """str -> (n_bytes,) uint8 token ids."""
    return np.frombuffer(text.encode("utf-8"), np.uint8).copy()


def decode(tokens) -> str:
    """token ids -> str (invalid UTF-8 sequences replaced)."""
    return bytes(np.asarray(tokens, np.uint8).tolist()).decode("utf-8", errors="replace")


def stdlib_files() -> tuple[Path, list[Path]]:
    """(root, sorted .py files of this Python's standard library, third-party packages excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__"))
        files.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py"))
    return root, files


class Corpus(NamedTuple):
    train: np.ndarray  # (n_train_bytes,) uint8
    val: np.ndarray  # (n_val_bytes,) uint8
    n_files: int  # documents read (files, or JSONL lines / Parquet rows / dataset rows)
    fingerprint: str  # crc32 of all bytes, to tell corpora (e.g. Python versions) apart


@functools.lru_cache(maxsize=4)
def load_corpus(path: str, val_fraction: float) -> Corpus:
    """Read, split by document (hash of its name), concatenate with DOC_SEPARATOR."""
    from cfm_jax.data.corpora import read_documents, read_text_file

    if path:
        docs = read_documents(path)
    else:
        root, files = stdlib_files()
        docs = [(f.relative_to(root).as_posix(), raw) for f in files if (raw := read_text_file(f))]
    if not docs:
        raise UserError(f"data.path={path!r} holds no readable UTF-8 text")
    threshold = int(val_fraction * 2**32)
    is_val = [zlib.crc32(name.encode()) < threshold for name, _ in docs]
    if len(docs) < 2 or all(is_val) or not any(is_val):
        # Too few documents to split by document: hold out the tail of the concatenation instead.
        blob = DOC_SEPARATOR.join(raw for _, raw in docs)
        cut = int(len(blob) * (1 - val_fraction))
        train, val = blob[:cut], blob[cut:]
    else:
        train = DOC_SEPARATOR.join(raw for (_, raw), v in zip(docs, is_val) if not v)
        val = DOC_SEPARATOR.join(raw for (_, raw), v in zip(docs, is_val) if v)
    fingerprint = f"{zlib.crc32(val, zlib.crc32(train)):08x}"
    return Corpus(np.frombuffer(train, np.uint8), np.frombuffer(val, np.uint8), len(docs), fingerprint)


def _windows(data: np.ndarray, starts: np.ndarray, seq_len: int) -> dict[str, np.ndarray]:
    idx = starts[:, None] + np.arange(seq_len + 1)  # (batch, seq_len + 1)
    chunk = data[idx].astype(np.int32)
    return {"inputs": chunk[:, :-1], "labels": chunk[:, 1:]}


@dataclass(frozen=True)
class TextConfig(DataConfig):
    path: str = ""  # a UTF-8 file, directory or glob of text / JSONL / Parquet, or a saved HF dataset; "" = this Python's standard-library sources
    val_fraction: float = 0.05  # share of documents held out for validation (split by document name)
    tokenizer: str = "bytes"  # bytes (vocabulary 256), bpe:N (trained on the training split, cached) or a tokenizer.json path


class TextTask(Task):
    name = "text"
    config_cls = TextConfig

    def __init__(self, cfg):
        super().__init__(cfg)
        self.corpus = load_corpus(cfg.path, cfg.val_fraction)
        if cfg.tokenizer == "bytes":
            self.train_tokens, self.val_tokens, self.vocab_size = self.corpus.train, self.corpus.val, VOCAB_SIZE
            self.tokenizer_info = {"tokenizer": "bytes"}
        else:
            from cfm_jax.data.tokenize import tokenized_corpus

            self.train_tokens, self.val_tokens, self.vocab_size, self.tokenizer_info = tokenized_corpus(
                self.corpus, cfg.tokenizer)
        # Bits per byte = loss / ln 2 / (held-out bytes per token): comparable across tokenizers.
        self.bytes_per_token = len(self.corpus.val) / max(1, len(self.val_tokens))
        for split, tokens in (("train", self.train_tokens), ("val", self.val_tokens)):
            if len(tokens) < cfg.seq_len + 2:
                raise UserError(
                    f"the {split} split of data.path={cfg.path!r} has {len(tokens)} tokens, fewer than data.seq_len + 2 = {cfg.seq_len + 2}"
                )

    @classmethod
    def validate(cls, cfg) -> None:
        from cfm_jax.data.tokenize import check_tokenizer

        import glob

        if not 0 < cfg.val_fraction < 1:
            raise UserError(f"data.val_fraction={cfg.val_fraction} must be in (0, 1)")
        if cfg.path and not glob.has_magic(cfg.path) and not Path(cfg.path).expanduser().exists():
            raise UserError(
                f"data.path={cfg.path!r} does not exist (give a UTF-8 text file, a directory or glob of text / JSONL / "
                "Parquet shards, a saved Hugging Face dataset, or '' for the stdlib corpus)"
            )
        check_tokenizer(cfg.tokenizer)

    def train_batch(self, seed: int, step: int, batch_size: int) -> dict[str, np.ndarray]:
        data, seq_len = self.train_tokens, self.cfg.seq_len
        starts = np.random.default_rng((seed, step)).integers(0, len(data) - seq_len - 1, batch_size)
        return _windows(data, starts, seq_len)

    def eval_sets(self, batch_size: int) -> dict[str, list[dict[str, np.ndarray]]]:
        """"val": eval_batches batches of windows at evenly spaced offsets of the held-out documents."""
        data, seq_len, n = self.val_tokens, self.cfg.seq_len, self.cfg.eval_batches
        starts = np.linspace(0, len(data) - seq_len - 1, n * batch_size).astype(np.int64)
        return {"val": [_windows(data, starts[i * batch_size:(i + 1) * batch_size], seq_len) for i in range(n)]}
