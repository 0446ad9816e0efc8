"""Orbax checkpoints of the training state under workdir/checkpoints, keeping the last N.

Orbax writes each step into a temporary directory and renames it when complete, so a crash never
leaves a half-written checkpoint as the latest. Each saved step's SHA-256 over every array's bytes
is kept in checkpoints/digests.json and checked on restore, so flipped bits in a data file are
found; `restore_latest` then falls back to the newest intact step and says so on stderr.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from cfm_jax.errors import UserError

DIGESTS = "digests.json"


@contextlib.contextmanager
def quiet_logger(name: str, level: int = logging.CRITICAL):
    """Raise a library logger's level for a block: orbax's asyncio tasks log their own tracebacks on
    a failed read or write (reported here as one error line), and orbax's absl logs a warning when it
    reads a step's metadata that is not needed."""
    logger = logging.getLogger(name)
    before = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(before)


@contextlib.contextmanager
def orbax_stderr():
    """Send what orbax's and tensorstore's threads write to stderr (fd 2) during a save or close to a
    temporary file: on a failed write (a full disk) they print hundreds of lines of tracebacks of their
    own; the failure itself reaches the user as one error line."""
    sys.stderr.flush()
    kept = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(kept, 2)
            os.close(kept)


class ShapeMismatch(UserError):
    """The checkpoint is intact but holds arrays of other shapes than the model being restored."""


def saved_shapes(step_dir: Path) -> list[tuple] | None:
    """Shapes of every array saved in a step directory (sorted), from orbax's metadata; None if unreadable."""
    checkpointer = ocp.StandardCheckpointer()
    try:
        with quiet_logger("absl", logging.ERROR):
            meta = checkpointer.metadata(Path(step_dir) / "default")
        meta = getattr(meta, "item_metadata", meta)
        shapes = sorted(tuple(leaf.shape) for leaf in jax.tree.leaves(meta) if hasattr(leaf, "shape"))
        return shapes or None  # an empty or metadata-less step: let the restore itself report it
    except Exception:  # noqa: BLE001 - an unreadable step is reported by the restore itself
        return None
    finally:
        checkpointer.close()


def digest(state) -> str | None:
    """SHA-256 over every leaf's dtype, shape and bytes (None where a leaf lives on other hosts)."""
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(state):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            return None
        a = np.asarray(leaf)
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


class Checkpoints:
    def __init__(self, directory: Path, keep: int):
        self.options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(self.directory, options=self.options)

    def _reopen(self) -> None:
        """A fresh manager: after a failed restore (an empty or broken step directory) orbax's
        manager can refuse every later restore, intact steps included."""
        self.manager.close()
        self.manager = ocp.CheckpointManager(self.directory, options=self.options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def _digests(self) -> dict:
        try:
            return json.loads((self.directory / DIGESTS).read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def save(self, step: int, state) -> None:
        from cfm_jax.workdir import write_json

        try:
            with quiet_logger("asyncio"), orbax_stderr():
                self.manager.save(step, args=ocp.args.StandardSave(state), force=True)
                self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - orbax and tensorstore raise many types for a failed write
            text = str(e)
            if "No space left" in text or "RESOURCE_EXHAUSTED" in text or getattr(e, "errno", None) == errno.ENOSPC:
                raise OSError(errno.ENOSPC, f"no space left on device while saving checkpoint step {step}",
                              str(self.directory)) from None
            raise
        if jax.process_index() == 0 and (d := digest(state)) is not None:
            kept = {str(s) for s in self.manager.all_steps()}
            write_json(self.directory / DIGESTS, {k: v for k, v in {**self._digests(), str(step): d}.items() if k in kept})

    def restore_latest(self, like) -> tuple[int, object] | tuple[None, None]:
        """(step, state) of the newest step that restores and matches its digest, falling back past
        broken ones with one warning line each (they are renamed checkpoints/rejected-STEP-TIME, kept
        for inspection, so the run can save those steps again); (None, None) with no checkpoint;
        UserError if none is intact."""
        steps = sorted(self.manager.all_steps(), reverse=True)
        errors = []
        for i, step in enumerate(steps):
            try:
                state = self.restore(step, like)
                for bad in steps[:i]:  # aside, so training can save these step numbers again
                    (self.directory / str(bad)).rename(self.directory / f"rejected-{bad}-{time.strftime('%Y%m%dT%H%M%S')}")
                if i:
                    self._reopen()
                return step, state
            except ShapeMismatch:
                raise  # every step of a workdir has the same shapes: falling back cannot help
            except UserError as e:
                errors.append(e)
                self._reopen()
                if i + 1 < len(steps):
                    print(f"warning: {e.args[0].split(';')[0]}; falling back to step {steps[i + 1]}", file=sys.stderr)
        if errors:
            raise errors[0]
        return None, None

    def restore(self, step: int, like):
        """Restore `step` into the structure, dtypes, shapes and shardings of `like` (so a checkpoint
        saved under one mesh restores under another)."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        saved = saved_shapes(self.directory / str(step))
        wanted = sorted(tuple(x.shape) for x in jax.tree.leaves(abstract))
        if saved is not None and saved != wanted:
            example = next(((a, b) for a, b in zip(saved, wanted) if a != b), (len(saved), len(wanted)))
            raise ShapeMismatch(
                f"checkpoint step {step} in {self.directory} is intact but was saved by a model of other shapes "
                f"(e.g. saved {example[0]} where this config has {example[1]}); this config does not fit it: "
                "use the config it was trained with, or another --workdir")
        try:
            with quiet_logger("asyncio"):
                state = self.manager.restore(step, args=ocp.args.StandardRestore(abstract))
        except Exception as e:  # noqa: BLE001 - orbax raises many types for unreadable data
            detail = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            raise UserError(
                f"checkpoint step {step} in {self.directory} cannot be restored ({detail}); "
                "remove that step directory to fall back to an earlier one, or use another --workdir"
            ) from None
        expected = self._digests().get(str(step))
        if expected is not None and digest(state) not in (None, expected):
            raise UserError(f"checkpoint step {step} in {self.directory} cannot be restored (its data does not match "
                            f"the digest saved with it: corrupted on disk); remove that step directory or use another --workdir")
        return state

    def close(self) -> None:
        with orbax_stderr():
            self.manager.close()
