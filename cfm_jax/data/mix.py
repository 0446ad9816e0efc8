"""`data.task=mix`: byte-level text mixed with the skills the bricks and dynamic analyses probe, so a
model trained on it has those skills (CFM sections 4.4-4.5 read skills the model was trained on).

Every training batch holds rows of text, MQAR and copy in the fixed shares data.mix_weights (text,
mqar, copy), all at the byte vocabulary (256) and data.seq_len: text windows as `data.task=text`, MQAR
rows from `mqar_batch` at vocabulary 256 with data.num_kv_pairs (the analyses' generator), copy rows
from `repeat_copy_batch`. Rows are split by largest remainder, in that order.
Eval sets: "val" (held-out text; val/loss is the text loss), "mqar" and "copy" (fixed batches).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cfm_jax.data.base import EVAL_STREAM, Task
from cfm_jax.data.copying import CopyingConfig, repeat_copy_batch
from cfm_jax.data.mqar import MQARConfig, check_mqar, mqar_batch
from cfm_jax.data.text import VOCAB_SIZE, TextConfig, TextTask
from cfm_jax.errors import UserError

PARTS = ("text", "mqar", "copy")


def split_rows(batch: int, weights: tuple[int, ...]) -> list[int]:
    """Rows per part, proportional to weights (largest remainder; sums to batch)."""
    total = sum(weights)
    exact = [batch * w / total for w in weights]
    rows = [int(x) for x in exact]
    for i in sorted(range(len(weights)), key=lambda i: rows[i] - exact[i])[: batch - sum(rows)]:
        rows[i] += 1
    return rows


@dataclass(frozen=True)
class MixConfig(TextConfig, MQARConfig, CopyingConfig):
    """The text, MQAR and copy settings of its three row kinds, and their shares."""

    mix_weights: tuple[int, ...] = (2, 1, 1)  # rows of text, mqar, copy per batch, in these shares


class MixTask(Task):
    name = "mix"
    config_cls = MixConfig
    vocab_size = VOCAB_SIZE
    bytes_per_token = 1.0  # its "val" set is byte-level text

    def __init__(self, cfg):
        super().__init__(cfg)
        self.text = TextTask(cfg)
        self.corpus = self.text.corpus  # recorded in eval.json like text's

    @classmethod
    def validate(cls, cfg) -> None:
        TextTask.validate(cfg)
        if cfg.tokenizer != "bytes":
            raise UserError(f"data.tokenizer={cfg.tokenizer!r}: data.task=mix needs the byte tokenizer (its skills use byte ids)")
        w = cfg.mix_weights
        if len(w) != len(PARTS) or any(x < 0 for x in w) or sum(w) == 0:
            raise UserError(f"data.mix_weights={','.join(map(str, w))} must be {len(PARTS)} non-negative integers "
                            f"({', '.join(PARTS)}), not all 0")
        check_mqar(cfg.seq_len, VOCAB_SIZE, cfg.num_kv_pairs, cfg.power_a)

    def _skills(self, rng: np.random.Generator, mqar_rows: int, copy_rows: int) -> list[dict[str, np.ndarray]]:
        c = self.cfg
        inputs, labels = mqar_batch(rng, mqar_rows, c.seq_len, VOCAB_SIZE, c.num_kv_pairs, c.power_a, c.mqar_filler)
        return [{"inputs": inputs, "labels": labels}, repeat_copy_batch(rng, copy_rows, c.seq_len, VOCAB_SIZE)]

    def train_batch(self, seed: int, step: int, batch_size: int) -> dict[str, np.ndarray]:
        text_rows, mqar_rows, copy_rows = split_rows(batch_size, self.cfg.mix_weights)
        parts = [self.text.train_batch(seed, step, text_rows),
                 *self._skills(np.random.default_rng((seed, step, 0x5C111)), mqar_rows, copy_rows)]
        return {k: np.concatenate([p[k] for p in parts]).astype(np.int32) for k in ("inputs", "labels")}

    def eval_sets(self, batch_size: int) -> dict[str, list[dict[str, np.ndarray]]]:
        sets = {"val": self.text.eval_sets(batch_size)["val"], "mqar": [], "copy": []}
        for i in range(self.cfg.eval_batches):
            mqar, copy = self._skills(np.random.default_rng((EVAL_STREAM, 0x5C111, i)), batch_size, batch_size)
            sets["mqar"].append(mqar)
            sets["copy"].append(copy)
        return sets
