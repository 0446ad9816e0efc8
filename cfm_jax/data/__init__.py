"""Tasks: a name -> class registry of data sources. Each yields batches reproducible from (seed, step).

A batch is {"inputs": (batch, seq) int32, "labels": (batch, seq) int32}; labels[t] is the target
for position t, IGNORE where the position is not scored.
"""

from __future__ import annotations

import importlib
import pkgutil

from cfm_jax.data.base import IGNORE, TASKS, Task
from cfm_jax.errors import UserError

# Importing every module of this package registers its tasks (Task.__init_subclass__).
for _info in pkgutil.iter_modules(__path__, __name__ + "."):
    importlib.import_module(_info.name)


def get_task_class(name: str) -> type[Task]:
    from cfm_jax.registry import load_plugins

    load_plugins()  # tasks defined by plugins register on import, like kinds
    if name not in TASKS:
        raise UserError(f"unknown data.task {name!r}; allowed: {', '.join(sorted(TASKS))}")
    return TASKS[name]


def make_task(cfg) -> Task:
    return get_task_class(cfg.task)(cfg)


__all__ = ["IGNORE", "TASKS", "Task", "get_task_class", "make_task"]
