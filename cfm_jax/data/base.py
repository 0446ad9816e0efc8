"""The task interface shared by text and synthetic tasks."""

from __future__ import annotations

import abc
from typing import ClassVar

import numpy as np

from cfm_jax.config import DataConfig

IGNORE = -1  # label of positions that are not scored
EVAL_STREAM = 0x5EED  # seeds evaluation data apart from every training seed's stream


TASKS: dict[str, type["Task"]] = {}  # name -> class: every Task subclass with a `name` registers itself


class Task(abc.ABC):
    """A data source. A subclass that sets `name` is registered as `data.task=NAME` when its module is
    imported (the package's modules, or a plugin's: CFM_JAX_PLUGINS)."""

    name: ClassVar[str]
    config_cls: ClassVar[type[DataConfig]] = DataConfig  # the task's settings: DataConfig + its own fields
    has_depth: ClassVar[bool] = False  # whether a needle depth in [0, 1] applies (needle_depth, eval_depths)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if getattr(cls, "name", "") and "name" in cls.__dict__:
            previous = TASKS.get(cls.name)
            if previous is not None and previous.__qualname__ != cls.__qualname__:
                raise ValueError(f"data.task {cls.name!r} registered twice ({previous.__qualname__}, {cls.__qualname__})")
            TASKS[cls.name] = cls
    vocab_size: int
    # Text tasks: held-out UTF-8 bytes per token, so eval reports bits per byte = loss / ln 2 /
    # bytes_per_token (1 for the byte tokenizer); None for synthetic tasks.
    bytes_per_token: float | None = None

    def __init__(self, cfg):
        self.cfg = cfg

    @classmethod
    def validate(cls, cfg) -> None:
        """Raise UserError (one line) for settings this task cannot generate."""

    @abc.abstractmethod
    def train_batch(self, seed: int, step: int, batch_size: int) -> dict[str, np.ndarray]:
        """The training batch of `step`: a pure function of (seed, step) and the config."""

    @abc.abstractmethod
    def eval_sets(self, batch_size: int) -> dict[str, list[dict[str, np.ndarray]]]:
        """Named fixed evaluation sets (e.g. "val" or "len512"), each a list of batches."""
