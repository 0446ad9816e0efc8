"""`cfm-jax bench --suite sparse_loss`: the predicted sparse-decode speedup of a model *trained* at
the FATReLU threshold that gives each activation ratio, with its validation loss beside the dense
model's, in one table.

The `sparse_decode` suite times a FATReLU threshold applied to a model trained at threshold 0, so the
loss at which that speed comes is not measured. Here, per seed:

    base      the byte-level model of the predictor suite (2 layers, ReLU neuron-sparse FFN) trained
              `steps` steps at threshold 0
    control   base fine-tuned `finetune_steps` more at threshold 0 (the dense reference: the same
              number of steps as every sparse row, so extra training is not read as sparsity's cost)
    ratio r   base fine-tuned `finetune_steps` at threshold t_r (every layer), t_r = base's last-layer
              FFN's (1 - r) quantile of x W_up on training text, or 0 where that quantile is < 0
              (a FATReLU threshold cannot be negative: base is already that sparse)

Each row's validation loss is compared with the control's, paired by seed (same data order and
initialisation). The timings (predicted active set read in place, against the dense FFN, batch 1)
are taken on seed 0's fine-tuned last FFN at its own threshold, through `predictor.measure_threshold`.
"""

from __future__ import annotations

import numpy as np
from flax import nnx

from cfm_jax.bench import predictor
from cfm_jax.harness import stats
from cfm_jax.train import cross_entropy

WITHIN = 0.01  # "at matched quality": the loss at most 1 % above the dense control's


def val_loss(model, task) -> float:
    """Mean cross-entropy (nats per token) over the held-out text's validation windows."""
    total = count = 0.0
    for batch in task.eval_sets(8)["val"]:
        logits, _ = model(batch["inputs"])
        ce, _, n = cross_entropy(logits, batch["labels"])
        total, count = total + float(ce), count + float(n)
    return total / count


def state_of(model):
    _, params, rest = nnx.split(model, nnx.Param, ...)
    return params, rest


def at_measured_loss(d: int, f: int, steps: int, finetune_steps: int, ratios, seeds: int, tokens: int,
                     rounds: int, dram_layers: int = 0) -> dict:
    """{"setup", "control": {loss values}, RATIO: {threshold per seed, loss values, comparison with the
    control, activation ratios, timings of seed 0}} or {"skipped": why}."""
    if why := predictor.active_rows.available():
        return {"skipped": why}
    out = {"setup": {"d_model": d, "d_ff": f, "layers": 2, "steps": steps, "finetune_steps": finetune_steps,
                     "seeds": seeds, "timed_seed": 0}}
    control, rows = [], {str(r): {"threshold": [], "loss": [], "last_layer_ratio": []} for r in ratios}
    for seed in range(seeds):
        base, task, _ = predictor.train_at(d, f, steps, seed)
        fit = predictor.model_view(base, task, seed)
        selector_fit = fit["fit"] @ fit["up"]
        reference, _, _ = predictor.train_at(d, f, finetune_steps, seed, 0.0, start=state_of(base))
        control.append(val_loss(reference, task))
        for ratio in ratios:
            row = rows[str(ratio)]
            t = max(0.0, float(np.quantile(selector_fit, 1 - ratio)))
            tuned, _, _ = predictor.train_at(d, f, finetune_steps, seed, t, start=state_of(base))
            view = predictor.model_view(tuned, task, seed)
            row["threshold"].append(t)
            row["loss"].append(val_loss(tuned, task))
            row["last_layer_ratio"].append(float(np.mean(view["held_out"] @ view["up"] > t)))
            if seed == 0:
                timing = predictor.measure_threshold(view, t, tokens, rounds, dram_layers)
                timing.pop("lift")
                row["timing"] = timing
    out["control"] = {"loss": control, **stats.summarize(control)}
    for key, row in rows.items():
        row.update(stats.summarize(row["loss"]))
        row["vs_control"] = stats.compare(row["loss"], control)
        row["relative_increase"] = stats.summarize(list(np.array(row["loss"]) / np.array(control) - 1))
        out[key] = row
    return out


def markdown(result: dict) -> list[str]:
    """The one table: per activation ratio, loss beside the dense control's and the decode speedup."""
    if "skipped" in result:
        return [f"Skipped: {result['skipped']}.", ""]
    s, c = result["setup"], result["control"]
    lines = [f"A byte-level model (d_model {s['d_model']}, d_ff {s['d_ff']}, {s['layers']} layers, ReLU "
             f"neuron-sparse FFN) trained {s['steps']} steps at threshold 0, then fine-tuned {s['finetune_steps']} "
             f"steps at each row's FATReLU threshold (every layer); the dense control is the same model "
             f"fine-tuned {s['finetune_steps']} steps at threshold 0. n = {s['seeds']} seeds, validation "
             f"loss in nats per byte (mean, 95 % CI); the difference is paired by seed (paired t). Timings: "
             f"seed {s['timed_seed']}'s fine-tuned last FFN at its own threshold, one token per call, the "
             "predicted active set read in place against XLA's dense FFN (cache-resident; from DRAM where measured).", "",
             "| target ratio | threshold (seed 0) | measured ratio, last layer | val loss | dense control | "
             "difference (95 % CI, p) | loss increase (95 % CI) | predicted speedup | from DRAM | recall |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    fmt_ci = lambda r: f"{r['mean']:.4f} [{r['ci'][0]:.4f}, {r['ci'][1]:.4f}]"
    for key, row in result.items():
        if key in ("setup", "control"):
            continue
        v, t, ri = row["vs_control"], row.get("timing", {}), row["relative_increase"]
        dram = t.get("dram", {}).get("speedup")
        own = " (0: the control itself)" if max(row["threshold"]) == 0 else ""
        lines.append(f"| {key} | {row['threshold'][0]:.3f}{own} | {np.mean(row['last_layer_ratio']):.3f} | {fmt_ci(row)} | "
                     f"{fmt_ci(c)} | {v['diff']:+.4f} [{v['ci'][0]:+.4f}, {v['ci'][1]:+.4f}], p = {v['p']:.2g} | "
                     f"{ri['mean']:+.2%} [{ri['ci'][0]:+.2%}, {ri['ci'][1]:+.2%}] | {t.get('speedup', float('nan')):.2f}x | "
                     f"{'-' if dram is None else f'{dram:.2f}x'} | {t.get('recall', float('nan')):.4f} |")
    lines += ["", *reading(result), ""]
    return lines


def reading(result: dict) -> list[str]:
    """What the rows establish against ProSparse's criterion (loss within WITHIN of dense): a row is
    within when the upper end of its loss increase's 95 % CI is below WITHIN, worse when the lower
    end is above it, and otherwise not settled at this many seeds."""
    n = result["setup"]["seeds"]
    out = []
    for key, row in result.items():
        if key in ("setup", "control"):
            continue
        lo, hi = row["relative_increase"]["ci"]
        ratio = f"target {key} (measured {np.mean(row['last_layer_ratio']):.3f} in the last layer)"
        if max(row["threshold"]) == 0:
            out.append(f"- {ratio}: the trained ReLU already fires this sparsely at threshold 0, so this row is the "
                       "dense control itself; it shows the speed at the model's own sparsity, at no loss by construction.")
        elif hi < WITHIN:
            out.append(f"- {ratio}: within {WITHIN:.0%} of the dense control's loss (increase 95 % CI "
                       f"[{lo:+.2%}, {hi:+.2%}]).")
        elif lo > WITHIN:
            out.append(f"- {ratio}: more than {WITHIN:.0%} worse than the dense control (CI [{lo:+.2%}, {hi:+.2%}]).")
        else:
            out.append(f"- {ratio}: not settled at n = {n} seeds: the loss increase's CI [{lo:+.2%}, {hi:+.2%}] "
                       f"straddles {WITHIN:.0%} (difference from the control p = {row['vs_control']['p']:.2g}).")
    return [f"Against ProSparse's criterion (loss within {WITHIN:.0%} of dense, judged by the 95 % CI of the "
            "per-seed loss increase):", *out]
