"""Documents from your own data (`data.path`): (name, UTF-8 bytes) pairs, in a stable order.

- a file: `.jsonl` (one JSON object per line, its "text" field one document), `.parquet` (the "text"
  column, one document per row; needs pyarrow), any other file one UTF-8 document (binary files skipped);
- a directory (read recursively) or a glob (`shards/*.jsonl`) of such files;
- a Hugging Face dataset saved with `save_to_disk` (a directory holding `dataset_info.json` or
  `state.json`; read with the `datasets` library, the "text" column, all splits in order).
Names are the file's path relative to the root, plus `#line` / `#row`: the train / validation split
hashes them, so it never depends on read order.
"""

from __future__ import annotations

import glob
import json
from pathlib import Path

from cfm_jax.errors import UserError

TEXT_FIELD = "text"


def _files(path: str) -> tuple[Path, list[Path]]:
    """(root, files), resolved: documents are named by their path relative to the root."""
    if glob.has_magic(path):
        pattern = Path(path).expanduser()
        files = sorted(Path(p) for p in glob.glob(str(pattern), recursive=True) if Path(p).is_file())
        if not files:
            raise UserError(f"data.path={path!r} matches no files")
        # The root: the pattern's leading folders without a wildcard, so names do not depend on the cwd.
        root = Path(*_leading_literal(pattern.parts)) if pattern.parts else Path(".")
        return root.resolve(), [f.resolve() for f in files]
    p = Path(path).expanduser()
    if p.is_file():
        return p.parent.resolve(), [p.resolve()]
    if p.is_dir():
        return p.resolve(), sorted(f.resolve() for f in p.rglob("*") if f.is_file() and "__pycache__" not in f.parts)
    raise UserError(f"data.path={path!r} does not exist (give a UTF-8 text file, a directory or glob of text / JSONL / "
                    "Parquet shards, a saved Hugging Face dataset, or '' for the stdlib corpus)")


def _leading_literal(parts) -> list[str]:
    out = []
    for part in parts[:-1]:  # the last part is a file pattern
        if glob.has_magic(part):
            break
        out.append(part)
    return out or ["."]


def _is_saved_dataset(path: Path) -> bool:
    """What `save_to_disk` writes: dataset_dict.json (a DatasetDict) or state.json + dataset_info.json."""
    return path.is_dir() and ((path / "dataset_dict.json").exists()
                              or ((path / "state.json").exists() and (path / "dataset_info.json").exists()))


def _saved_dataset(path: Path) -> list[tuple[str, bytes]]:
    try:
        import datasets
    except ImportError:
        raise UserError(f"data.path={str(path)!r} is a saved Hugging Face dataset; reading it needs the `datasets` "
                        "package (pip install datasets)") from None
    data = datasets.load_from_disk(str(path))
    parts = data.items() if isinstance(data, datasets.DatasetDict) else [("", data)]
    docs = []
    for split, part in parts:
        if TEXT_FIELD not in part.column_names:
            raise UserError(f"data.path={str(path)!r}: the dataset has no {TEXT_FIELD!r} column ({', '.join(part.column_names)})")
        docs += [(f"{split}#{i}", t.encode()) for i, t in enumerate(part[TEXT_FIELD]) if t]
    return docs


def _jsonl(f: Path, name: str) -> list[tuple[str, bytes]]:
    docs = []
    try:
        lines = f.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise UserError(f"{f} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            text = json.loads(line).get(TEXT_FIELD)
        except (ValueError, AttributeError):
            raise UserError(f"{f}: line {i + 1} is not a JSON object") from None
        if isinstance(text, str) and text:
            docs.append((f"{name}#{i}", text.encode()))
    return docs


def _parquet(f: Path, name: str) -> list[tuple[str, bytes]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"{f} is Parquet; reading it needs pyarrow (pip install pyarrow)") from None
    if TEXT_FIELD not in pq.read_schema(f).names:
        raise UserError(f"{f} has no {TEXT_FIELD!r} column ({', '.join(pq.read_schema(f).names)})")
    table = pq.read_table(f, columns=[TEXT_FIELD])
    return [(f"{name}#{i}", t.encode()) for i, t in enumerate(table.column(TEXT_FIELD).to_pylist()) if t]


def read_text_file(f: Path) -> bytes | None:
    """The file's bytes if it is readable, non-empty UTF-8 text; None otherwise (binary files are not text)."""
    try:
        raw = f.read_bytes()
        raw.decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    return raw or None


def read_documents(path: str) -> list[tuple[str, bytes]]:
    """(name, UTF-8 bytes) of every document under `path` (see the module doc)."""
    root = Path(path).expanduser()
    if _is_saved_dataset(root):
        return _saved_dataset(root)
    root, files = _files(path)
    docs: list[tuple[str, bytes]] = []
    for f in files:
        name = f.relative_to(root).as_posix() if f.is_relative_to(root) else f.as_posix()
        if f.suffix == ".jsonl":
            docs += _jsonl(f, name)
        elif f.suffix == ".parquet":
            docs += _parquet(f, name)
        elif raw := read_text_file(f):
            docs.append((name, raw))
    return docs
