"""Bench suite `seed_batch`: does training several seeds in one jitted step (jax.vmap over the seeds'
parameters, optimizer states and batches) beat one step per seed, for the tiny MQAR models of the
long-context grids?

Per model: the median step time of one seed's jitted step and of the vmapped step over N seeds, the
per-seed throughput gain (N x single / vmapped; above 1 it pays), and the largest difference between
the vmapped step's per-seed losses and the separate steps' (the same numbers, to rounding).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from cfm_jax.bench.timing import timed
from cfm_jax.config import resolve
from cfm_jax.data import make_task
from cfm_jax.train import init_state, make_train_step

# (mixer, vocabulary, length, key-value pairs, d_model): the grids' shapes, a Zoology-sized vocabulary
# and the quickstart's small one.
MODELS = {
    "smoke": [("attention", 64, 16, 2, 32)],
    "cpu": [("attention", 4096, 64, 8, 64), ("mamba", 4096, 64, 8, 64), ("attention", 64, 16, 2, 64)],
    "full": [("attention", 4096, 64, 8, 64), ("mamba", 4096, 64, 8, 64), ("attention", 8192, 256, 16, 128)],
}
SEEDS = {"smoke": 2, "cpu": 4, "full": 8}
BATCH = 64


def _stack(trees):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def vmapped_step(graphdef, tx):
    """The training step over stacked seeds: every argument with a leading seed axis but the step."""
    return jax.jit(jax.vmap(make_train_step(graphdef, tx, jit=False), in_axes=(0, 0, 0, 0, None)))


def measure(scale: str, mixer: str, vocab: int, length: int, pairs: int, d: int, seeds: int, reps: int) -> dict:
    overrides = ["data.task=mqar", f"data.vocab_size={vocab}", f"data.seq_len={length}", f"data.num_kv_pairs={pairs}",
                 "data.mqar_filler=unbound", f"model.d_model={d}", "model.n_layers=2", f"model.mixer={mixer}",
                 f"train.batch_size={BATCH}"]
    cfgs = [resolve(scale, [*overrides, f"train.seed={k}"]) for k in range(seeds)]
    task = make_task(cfgs[0].data)
    inits = [init_state(cfg, task.vocab_size) for cfg in cfgs]
    graphdef, tx = inits[0][0], inits[0][2]
    states = [i[1] for i in inits]
    batches = [task.train_batch(k, 0, BATCH) for k in range(seeds)]
    single = make_train_step(graphdef, tx)
    vmapped = vmapped_step(graphdef, tx)
    args = lambda st, b: (st["params"], st["rest"], st["opt_state"], b, 0)
    stacked = args(_stack(states), _stack(batches))
    single_s = timed(single, *args(states[0], batches[0]), reps=reps)
    vmapped_s = timed(vmapped, *stacked, reps=reps)
    separate = np.array([float(single(*args(st, b))[3]["loss"]) for st, b in zip(states, batches)])
    together = np.asarray(vmapped(*stacked)[3]["loss"])
    return {"model": f"{mixer} V{vocab} L{length} kv{pairs} d{d}", "seeds": seeds,
            "single_step_s": single_s, "vmapped_step_s": vmapped_s,
            "tokens_per_s_single": BATCH * length / single_s, "tokens_per_s_vmapped": seeds * BATCH * length / vmapped_s,
            "gain": seeds * single_s / vmapped_s, "max_loss_diff": float(np.max(np.abs(separate - together)))}


def suite_seed_batch(scale: str, reps: int) -> dict:
    return {"models": [measure(scale, *m, seeds=SEEDS[scale], reps=reps) for m in MODELS[scale]]}


def markdown(result: dict) -> list[str]:
    lines = ["## Several seeds in one jitted step (seed_batch)", "",
             "MQAR training step (batch 64, 2 layers, unbound filler): one seed's jitted step against `jax.vmap` "
             "of the same step over N seeds (parameters, optimizer states and batches stacked). Gain = N x single "
             "/ vmapped: above 1, batching seeds in one process pays. Loss diff: the largest difference between "
             "the vmapped step's per-seed losses and the separate steps'.", "",
             "| model | N | single step (ms) | vmapped step (ms) | tokens/s single | tokens/s vmapped | gain | loss diff |",
             "|---|---|---|---|---|---|---|---|"]
    for m in result["models"]:
        lines.append(f"| {m['model']} | {m['seeds']} | {m['single_step_s'] * 1e3:.1f} | {m['vmapped_step_s'] * 1e3:.1f} | "
                     f"{m['tokens_per_s_single']:,.0f} | {m['tokens_per_s_vmapped']:,.0f} | {m['gain']:.2f}x | "
                     f"{m['max_loss_diff']:.1e} |")
    return [*lines, ""]
