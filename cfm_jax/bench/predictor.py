"""`cfm-jax bench`'s predicted sparse-decode measurement: a low-rank active-set predictor
(`cfm_jax.layers.active_predictor`) driving the in-place kernel (`cfm_jax.kernels.active_rows`), on
an FFN that was trained, against the dense FFN, batch 1.

A predictor needs a trained model: on random weights and inputs nothing is predictable. So this
trains a small byte-level language model with the suite's FFN size (2 layers, ReLU `neuron_sparse`
FFN) on the standard-library text for a few hundred steps, takes its last FFN, fits the predictor on
FFN inputs from training text and measures it on inputs from the held-out files: recall, output
error and latency over a set of held-out tokens, one token per call.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cfm_jax.config import resolve
from cfm_jax.data import make_task
from cfm_jax.kernels import active_rows
from cfm_jax.layers.active_predictor import evaluate, ffn_inputs, fit_predictor, predicted_ffn_reference
from cfm_jax.layers.neuron_sparse import fat_relu
from cfm_jax.train import init_state, make_train_step

RANK = 64  # predictor rank: (d + f) * 64 weights, 4 % of a d=1024, f=4096 FFN's
RECALL = 0.999  # recall the margin is fitted for, on the fitting inputs


def train_at(d: int, f: int, steps: int, seed: int, threshold: float = 0.0, start=None):
    """The suite's model (2 layers, ReLU neuron-sparse FFN of width f, byte-level text) trained `steps`
    steps at FATReLU `threshold` (every layer), from `start` (params, rest) when fine-tuning (on batches
    the first run never drew), else from its initialisation. -> (model in eval mode, task, last CE)."""
    cfg = resolve("smoke", [f"model.d_model={d}", "model.n_layers=2", "model.ffn=neuron_sparse",
                            f"model.ffn.d_ff={f}", f"model.ffn.threshold={threshold}", "data.task=text",
                            "data.seq_len=128", "train.batch_size=8", f"train.steps={steps}",
                            f"train.warmup_steps={max(1, steps // 10)}", f"train.seed={seed}"])
    task = make_task(cfg.data)
    graphdef, state, tx, _ = init_state(cfg, task.vocab_size)
    params, rest = (state["params"], state["rest"]) if start is None else start
    opt = tx.init(params)
    step_fn = make_train_step(graphdef, tx)
    first, ce = (0 if start is None else 10**6), None
    for step in range(steps):
        params, rest, opt, metrics = step_fn(params, rest, opt, task.train_batch(seed, first + step, 8), step)
        ce = metrics["ce"]
    model = nnx.merge(graphdef, params, rest)
    model.eval()
    return model, task, None if ce is None else float(ce)


def trained_ffn(d: int, f: int, steps: int, seed: int = 0) -> dict:
    """Train the model; return `model_view` of it and the final training loss."""
    model, task, train_loss = train_at(d, f, steps, seed)
    return {**model_view(model, task, seed), "train_loss": train_loss, "steps": steps}


def model_view(model, task, seed: int) -> dict:
    """A trained model's last FFN: W_up (d, f) and W_down (f, d), its inputs on training text ("fit",
    (4096, d), windows the training run did not draw) and on held-out text ("held_out", (N, d))."""
    fit_tokens = np.concatenate([task.train_batch(seed + 1, i, 8)["inputs"] for i in range(4)])  # unseen windows
    held_out = np.concatenate([b["inputs"] for b in task.eval_sets(8)["val"]])
    last = len(model.blocks) - 1
    ffn = model.blocks[last].ffn
    return {"up": np.asarray(ffn.up.kernel[...]), "down": np.asarray(ffn.down.kernel[...]),
            "fit": np.asarray(ffn_inputs(model, fit_tokens, last)), "held_out": np.asarray(ffn_inputs(model, held_out, last))}


def predicted_decode(d: int, f: int, steps: int, ratios, tokens: int, rounds: int, dram_layers: int = 0) -> dict:
    """{ratio: measurements} for each activation ratio (the FATReLU threshold set to the fitting
    inputs' (1 - ratio) quantile of x W_up), or {"skipped": why}. dram_layers > 0: also time both
    paths over that many copies of the FFN per token (`from_dram`), an eighth of the tokens."""
    if why := active_rows.available():
        return {"skipped": why}
    model = trained_ffn(d, f, steps)
    selector_fit, selector_held_out = model["fit"] @ model["up"], model["held_out"] @ model["up"]
    out = {"model": {"d_model": d, "d_ff": f, "layers": 2, "train_steps": steps, "train_loss": model["train_loss"],
                     "fit_tokens": len(model["fit"]), "held_out_tokens": len(model["held_out"]), "rank": RANK,
                     "recall_target": RECALL, "natural_ratio": float(np.mean(selector_held_out > 0))}}
    for ratio in ratios:
        row = measure_threshold(model, float(np.quantile(selector_fit, 1 - ratio)), tokens, rounds, dram_layers)
        out["model"]["timed_tokens"] = row.pop("timed_tokens")
        lift = row.pop("lift")
        out[str(ratio)] = row
    # Share of ||S||^2 in the predictor's subspace (lift: orthonormal rows). The subspace depends on S
    # only, not on the threshold: the same for every ratio.
    out["model"]["rank_energy"] = float(np.sum((selector_held_out @ lift.T) ** 2) / np.sum(selector_held_out**2))
    return out


def measure_threshold(model: dict, t: float, tokens: int, rounds: int, dram_layers: int = 0) -> dict:
    """A predictor fitted at FATReLU threshold t on `model_view`'s fitting inputs, its quality on the
    held-out inputs, and its in-place path timed against the dense FFN (and the exact active set, and
    the kernel reading every row) on `tokens` held-out inputs, one per call."""
    up, down = model["up"], model["down"]
    d, f = up.shape
    xs = jnp.asarray(model["held_out"][:: max(1, len(model["held_out"]) // tokens)][:tokens])  # (T, d), spread out
    up_j, up_rows, down_j = jnp.asarray(up), jnp.asarray(up.T), jnp.asarray(down)
    n = int(xs.shape[0])
    every = padded_lists(np.ones((n, f), bool))
    dense_in_place = jax.jit(lambda xs, idx, u, w: jax.lax.map(  # every row read and used: a dense FFN's work
        lambda a: active_rows.active_rows_ffn_in_place(a[0], u, w, a[1], -np.inf), (xs, idx)))
    pred = fit_predictor(model["fit"], up, t, RANK, RECALL)
    quality = evaluate(pred, model["held_out"], up, down, t)
    pred = jax.tree.map(jnp.asarray, pred)
    dense = jax.jit(lambda xs, u, w: jax.lax.map(lambda x: fat_relu(x @ u, t) @ w, xs))
    fast = jax.jit(lambda xs, p, u, w: jax.lax.map(lambda x: active_rows.predicted_rows_ffn_in_place(x, p, u, w, t), xs))
    reference = jax.jit(lambda xs, p, u, w: jax.lax.map(lambda x: predicted_ffn_reference(x, p, u, w, t), xs))
    got = fast(xs, pred, up_rows, down_j)
    if not np.allclose(got, reference(xs, pred, up_rows, down_j), rtol=1e-4, atol=1e-5):
        raise RuntimeError("the predicted in-place FFN differs from its reference: the timing would mislead")
    exact = dense(xs, up_j, down_j)
    firing = np.asarray(xs @ up_j > t)
    given = jax.jit(lambda xs, idx, u, w: jax.lax.map(
        lambda a: active_rows.active_rows_ffn_in_place(a[0], u, w, a[1], t), (xs, idx)))
    others = {"predicted": (fast, pred), "perfect": (given, padded_lists(firing)),
              "exact_in_place": (given, every), "dense_in_place": (dense_in_place, every)}
    row = {**quality, "threshold": t, "timed_output_error": float(jnp.linalg.norm(got - exact) / jnp.linalg.norm(exact)),
           "timed_firing_ratio": float(firing.mean()), "predictor_weights_share": RANK * (d + f) / (2 * d * f),
           "timed_tokens": n, "lift": np.asarray(pred.lift)}
    row.update(against_dense(lambda: jax.block_until_ready(dense(xs, up_j, down_j)), {
        name: lambda fn=fn, arg=arg: jax.block_until_ready(fn(xs, arg, up_rows, down_j))
        for name, (fn, arg) in others.items()}, rounds, n))
    if dram_layers:
        row["dram"] = from_dram(xs[: max(1, n // 8)], up, down, pred, t, dram_layers, rounds)
    return row


def from_dram(xs: jax.Array, up: np.ndarray, down: np.ndarray, pred, t: float, layers: int, rounds: int) -> dict:
    """Dense vs predicted over `layers` distinct copies of the FFN (and of its predictor) per token, as
    a model's layers each read once per token, so that (with enough copies) neither weights nor
    predictors stay in the CPU caches between tokens and every path streams from DRAM. Dense twice:
    XLA's, and the in-place kernel reading every row. Each layer's input depends on the one before
    (x + 1e-30 y: the same values, but no two layers can run at once). Per token and layer: {dense_s,
    dense_in_place_s, predicted_s}; speedups over XLA's dense (medians of paired rounds) with their
    ranges; the bytes each path reads per token and the last-level cache size."""
    copies = [(jnp.array(up), jnp.array(np.ascontiguousarray(up.T)), jnp.array(down)) for _ in range(layers)]
    preds = [jax.tree.map(jnp.array, pred) for _ in range(layers)]
    every = padded_lists(np.ones((xs.shape[0], up.shape[1]), bool))

    def through_layers(ffn_of_layer):
        def token(x):
            for layer in range(layers):
                x = x + 1e-30 * ffn_of_layer(layer, x)  # a data dependence, not a change of x
            return x
        return token

    dense = jax.jit(lambda xs, ws: jax.lax.map(through_layers(lambda i, x: fat_relu(x @ ws[i][0], t) @ ws[i][2]), xs))
    fast = jax.jit(lambda xs, ws, ps: jax.lax.map(through_layers(
        lambda i, x: active_rows.predicted_rows_ffn_in_place(x, ps[i], ws[i][1], ws[i][2], t)), xs))
    dense_in_place = jax.jit(lambda xs, ws, idx: jax.lax.map(through_layers(
        lambda i, x: active_rows.active_rows_ffn_in_place(x, ws[i][1], ws[i][2], idx, -np.inf)), xs))
    run_dense = lambda: jax.block_until_ready(dense(xs, copies))
    per = int(xs.shape[0]) * layers
    out = {"layers": layers, "weight_bytes": 2 * up.nbytes * layers, "last_level_cache_bytes": last_level_cache_bytes(),
           "tokens": int(xs.shape[0])}
    return {**out, **against_dense(run_dense, {
        "predicted": lambda: jax.block_until_ready(fast(xs, copies, preds)),
        "dense_in_place": lambda: jax.block_until_ready(dense_in_place(xs, copies, every[0]))}, rounds, per)}


def against_dense(run_dense, others: dict, rounds: int, per: int) -> dict:
    """Each of `others` (name -> a call) in paired rounds with run_dense, after two warm-up rounds.
    Seconds are per call / per: {NAME_s, NAME_speedup (median of the rounds' dense / NAME),
    NAME_speedup_range, dense_s (median over all rounds)}, and speedup / speedup_range = predicted's."""
    from cfm_jax.bench.timing import paired_rounds

    out, dense_times = {}, []
    for name, run in others.items():
        paired_rounds(run_dense, run, 2)  # warm-up
        times = paired_rounds(run_dense, run, rounds)
        dense_times += [r[0] for r in times]
        out[f"{name}_s"] = statistics.median(r[1] for r in times) / per
        out[f"{name}_speedup"] = statistics.median(r[0] / r[1] for r in times)
        out[f"{name}_speedup_range"] = [min(r[0] / r[1] for r in times), max(r[0] / r[1] for r in times)]
    out["dense_s"] = statistics.median(dense_times) / per
    out["speedup"], out["speedup_range"] = out["predicted_speedup"], out["predicted_speedup_range"]
    return out


def last_level_cache_bytes() -> int | None:
    """The largest CPU cache's size (Linux sysfs), or None where it cannot be read."""
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KMG")) * scale)
    return max(sizes) if sizes else None


def padded_lists(mask: np.ndarray) -> jax.Array:
    """(T, f) bool -> (T, K) int32: each row's set neuron indices, padded with -1 (ignored by the
    kernel) to the longest row's count."""
    rows = [np.flatnonzero(m) for m in mask]
    out = np.full((len(rows), max(1, max(len(r) for r in rows))), -1, np.int32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return jnp.asarray(out)
