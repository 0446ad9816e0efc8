"""Orbax checkpoints of the training state under workdir/checkpoints, keeping the last N.

Orbax writes each step into a temporary directory and renames it when complete, so a crash never
leaves a half-written checkpoint as the latest.
"""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp

from cfm_jax.errors import UserError


class Checkpoints:
    def __init__(self, directory: Path, keep: int):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state) -> None:
        self.manager.save(step, args=ocp.args.StandardSave(state), force=True)
        self.manager.wait_until_finished()

    def restore(self, step: int, like):
        """Restore `step` into the structure, dtypes, shapes and shardings of `like` (so a checkpoint
        saved under one mesh restores under another)."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        try:
            return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))
        except Exception as e:  # noqa: BLE001 - orbax raises many types for unreadable data
            detail = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            raise UserError(
                f"checkpoint step {step} in {self.directory} cannot be restored ({detail}); "
                "remove that step directory to fall back to an earlier one, or use another --workdir"
            ) from None

    def close(self) -> None:
        self.manager.close()
