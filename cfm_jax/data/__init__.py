"""Tasks: a name -> class registry of data sources. Each yields batches reproducible from (seed, step).

A batch is {"inputs": (batch, seq) int32, "labels": (batch, seq) int32}; labels[t] is the target
for position t, IGNORE where the position is not scored.
"""

from __future__ import annotations

from cfm_jax.data.base import IGNORE, Task
from cfm_jax.data.copying import CopyingTask, SelectiveCopyingTask
from cfm_jax.data.mix import MixTask
from cfm_jax.data.mqar import MQARTask
from cfm_jax.data.needle import NIAHMultiKey, NIAHMultiQuery, NIAHMultiValue, NIAHSingle, PasskeyTask
from cfm_jax.data.text import TextTask
from cfm_jax.data.tracking import VariableTrackingTask
from cfm_jax.errors import UserError

TASKS: dict[str, type[Task]] = {
    cls.name: cls
    for cls in (TextTask, MQARTask, NIAHSingle, NIAHMultiKey, NIAHMultiValue, NIAHMultiQuery, PasskeyTask,
                VariableTrackingTask, SelectiveCopyingTask, CopyingTask, MixTask)
}


def get_task_class(name: str) -> type[Task]:
    if name not in TASKS:
        raise UserError(f"unknown data.task {name!r}; allowed: {', '.join(sorted(TASKS))}")
    return TASKS[name]


def make_task(cfg) -> Task:
    return get_task_class(cfg.task)(cfg)


__all__ = ["IGNORE", "TASKS", "Task", "get_task_class", "make_task"]
