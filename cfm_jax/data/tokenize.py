"""BPE tokenizers for text (`data.tokenizer=bpe:N` or a `tokenizer.json` path), with a token cache.

`bpe:N` trains a byte-level BPE of N tokens (Hugging Face `tokenizers`) on the corpus's training
split; the tokenizer and the tokenized splits are cached under CFM_JAX_CACHE (default
~/.cache/cfm_jax)/tokens/<corpus fingerprint>-<tokenizer id>/ as tokenizer.json and memory-mapped
.npy files, so a second run with the same corpus and tokenizer starts at once. Documents are joined
with the end-of-document token, id 0 (`<|doc|>`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np

from cfm_jax.errors import UserError

DOC_TOKEN = "<|doc|>"


def check_tokenizer(spec: str) -> None:
    if spec == "bytes":
        return
    if m := re.fullmatch(r"bpe:(\d+)", spec):
        if not 260 <= int(m.group(1)) <= 1 << 20:
            raise UserError(f"data.tokenizer={spec!r}: the BPE size must be in [260, 1048576]")
    elif not (spec.endswith(".json") and Path(spec).expanduser().is_file()):
        raise UserError(f"data.tokenizer={spec!r} must be bytes, bpe:N (e.g. bpe:4096) or a path to a tokenizer.json file")
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        raise UserError(f"data.tokenizer={spec!r} needs the `tokenizers` package (pip install tokenizers)") from None


def cache_root() -> Path:
    return Path(os.environ.get("CFM_JAX_CACHE", Path.home() / ".cache" / "cfm_jax")).expanduser() / "tokens"


def _documents(blob: np.ndarray) -> list[str]:
    from cfm_jax.data.text import DOC_SEPARATOR

    return [d.decode("utf-8", errors="replace") for d in bytes(blob).split(DOC_SEPARATOR) if d]


def _train_bpe(docs: list[str], size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=size, special_tokens=[DOC_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer=trainer)
    return tok


def _encode(tok, docs: list[str], doc_id: int) -> np.ndarray:
    ids: list[int] = []
    for enc in tok.encode_batch(docs):
        ids.extend(enc.ids)
        ids.append(doc_id)
    dtype = np.uint16 if max(tok.get_vocab_size(), doc_id + 1) <= 1 << 16 else np.int32
    return np.asarray(ids, dtype)


def _build_cache(corpus, spec: str, files: dict) -> None:
    """Train (or load) the tokenizer, encode both splits, write them; tokenizer.json last, so its
    presence marks a complete cache. Temporary names are per process."""
    from tokenizers import Tokenizer

    if spec.startswith("bpe:"):
        tok = _train_bpe(_documents(corpus.train), int(spec[4:]))
    else:
        tok = Tokenizer.from_file(str(Path(spec).expanduser()))
    doc_id = tok.token_to_id(DOC_TOKEN)
    if doc_id is None:
        doc_id = tok.get_vocab_size()  # a tokenizer without our separator: one extra id
    suffix = f".tmp{os.getpid()}"
    for split in ("train", "val"):
        tmp = files[f"{split}.npy"].with_suffix(suffix + ".npy")
        np.save(tmp, _encode(tok, _documents(getattr(corpus, split)), doc_id))
        os.replace(tmp, files[f"{split}.npy"])
    tmp = files["tokenizer.json"].with_suffix(suffix + ".json")
    tok.save(str(tmp))
    os.replace(tmp, files["tokenizer.json"])


def tokenized_corpus(corpus, spec: str) -> tuple[np.ndarray, np.ndarray, int, dict]:
    """(train ids, val ids, vocabulary size, info) for a Corpus and a tokenizer spec, from the cache
    when present. info: tokenizer spec, its sha256, cache directory, whether the cache was hit."""
    from tokenizers import Tokenizer

    tid = spec if spec.startswith("bpe:") else hashlib.sha256(Path(spec).expanduser().read_bytes()).hexdigest()[:16]
    # The split sizes are in the key: a tail-split corpus has the same bytes (fingerprint) at any
    # data.val_fraction, but not the same split.
    folder = cache_root() / f"{corpus.fingerprint}-{len(corpus.train)}-{len(corpus.val)}-{tid.replace(':', '')}"
    files = {name: folder / name for name in ("tokenizer.json", "train.npy", "val.npy")}
    hit = all(f.exists() for f in files.values())
    if not hit:
        import fcntl

        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / ".lock", "a") as lock:  # one process builds the cache; the others wait, then read it
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not all(f.exists() for f in files.values()):
                _build_cache(corpus, spec, files)
    tok = Tokenizer.from_file(str(files["tokenizer.json"]))
    train, val = (np.load(files[f"{s}.npy"], mmap_mode="r") for s in ("train", "val"))
    vocab = max(tok.get_vocab_size(), int(max(train.max(), val.max())) + 1)
    info = {"tokenizer": spec, "tokenizer_sha256": hashlib.sha256(files["tokenizer.json"].read_bytes()).hexdigest()[:16],
            "cache": str(folder), "cache_hit": hit, "vocab_size": vocab}
    return train, val, vocab, info
