"""Variable tracking (RULER): chains of assignments hidden among noise; name every variable bound
to a value.

Each of data.num_chains chains has data.num_hops + 1 statements, [VAR, x_0, EQ, value] then
[VAR, x_i, EQ, x_{i-1}]; statements keep their order within a chain and are interleaved at random
positions of a filler haystack. The query [QUERY, value_of_chain_0] must be followed by the names
x_0 .. x_H of chain 0, in assignment order (scored).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cfm_jax.config import DataConfig
from cfm_jax.data.synthetic import EQ, QUERY, VAR, SyntheticTask, distinct, insert_blocks, shift_targets, token_ranges
from cfm_jax.errors import UserError

STATEMENT_LEN = 4


def variable_tracking_batch(rng, batch: int, length: int, vocab_size: int, num_chains: int, num_hops: int):
    r = token_ranges(vocab_size)
    per_chain = num_hops + 1
    names = distinct(rng, batch, *r["keys"], num_chains * per_chain).reshape(batch, num_chains, per_chain)
    values = distinct(rng, batch, *r["values"], num_chains)  # (b, C)
    sources = np.concatenate([values[..., None], names[..., :-1]], axis=2)  # what each name is set to
    statements = np.stack(
        [np.full(names.shape, VAR), names, np.full(names.shape, EQ), sources], axis=3
    ).reshape(batch, num_chains * per_chain, STATEMENT_LEN)  # chain-major
    n_statements = statements.shape[1]
    query = np.concatenate([np.full((batch, 1), QUERY), values[:, :1], names[:, 0]], axis=1)
    n_filler = length + 1 - query.shape[1] - n_statements * STATEMENT_LEN
    filler = rng.integers(*r["filler"], (batch, n_filler))
    # Sorted random insertion points, dealt to statements so that each chain stays in order.
    points = np.sort(rng.integers(0, n_filler + 1, (batch, n_statements)), axis=1)
    owners = np.argsort(rng.random((batch, n_statements)), axis=1) // per_chain  # chain of each slot
    rank = np.zeros_like(owners)
    for c in range(num_chains):  # k-th slot owned by chain c takes its k-th statement
        mine = owners == c
        rank = np.where(mine, np.cumsum(mine, axis=1) - 1, rank)
    statement_of_slot = owners * per_chain + rank
    starts = np.empty_like(points)
    np.put_along_axis(starts, statement_of_slot, points, axis=1)
    haystack, _ = insert_blocks(filler, statements, starts)
    tokens = np.concatenate([haystack, query], axis=1)
    answer = np.zeros(tokens.shape, bool)
    answer[:, -per_chain:] = True
    return shift_targets(tokens, answer)


@dataclass(frozen=True)
class VariableTrackingConfig(DataConfig):
    num_chains: int = 1  # assignment chains (the others distract)
    num_hops: int = 4  # assignments after the first in each chain


class VariableTrackingTask(SyntheticTask):
    name = "variable_tracking"
    config_cls = VariableTrackingConfig

    @classmethod
    def check(cls, cfg, length: int) -> None:
        if cfg.num_chains < 1 or cfg.num_hops < 1:
            raise UserError(f"data.num_chains={cfg.num_chains} and data.num_hops={cfg.num_hops} must be >= 1")
        needed = cfg.num_chains * (cfg.num_hops + 1) * STATEMENT_LEN + cfg.num_hops + 3
        if needed > length:
            raise UserError(f"variable_tracking with {cfg.num_chains} chain(s) of {cfg.num_hops} hops needs length >= {needed}, got {length}")

    def generate(self, rng, batch, length, depth):
        return variable_tracking_batch(rng, batch, length, self.vocab_size, self.cfg.num_chains, self.cfg.num_hops)
