"""Dynamic activation: do hard tokens light up more neurons? (CFM's claim; MoE's fixed k cannot.)

For each scored token: its active-neuron count (nonzero activations, averaged over layers) and its
loss. Reported: Spearman correlation, mean count per loss decile, and on MQAR the mean count per
token at an easy (few pairs) and a hard (many pairs) setting of the same length.

For MoE the hook sees per-expert combine weights, so a token's count is its routed experts times the
expert width (the expert neurons it computes; shared experts, always on, are left out): constant
under top-k by construction, variable under top-p.
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np

from cfm_jax.data.mqar import check_mqar, mqar_batch, probe_settings
from cfm_jax.errors import UserError
from cfm_jax.harness.neurons import analysis_units, make_capture_forward, spearman

N_BINS = 10


def counts_and_losses(capture, batches: list[dict], per_unit: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(active count per token averaged over layers, per-token loss, scored mask), all flat. per_unit:
    neurons per captured unit (1 for neurons, the expert width for MoE combine weights)."""
    counts, losses, masks = [], [], []
    for batch in batches:
        ce, mask, captured = capture(jnp.asarray(batch["inputs"]), jnp.asarray(batch["labels"]))
        per_layer = jnp.stack([jnp.sum(a != 0, axis=-1) for a in captured])  # (layers, b, s)
        counts.append(per_unit * np.asarray(jnp.mean(per_layer.astype(jnp.float32), axis=0)).ravel())
        losses.append(np.asarray(ce).ravel())
        masks.append(np.asarray(mask).ravel())
    return np.concatenate(counts), np.concatenate(losses), np.concatenate(masks)


def summarize(counts: np.ndarray, losses: np.ndarray, mask: np.ndarray) -> dict:
    c, l = counts[mask], losses[mask]
    edges = np.quantile(l, np.linspace(0, 1, N_BINS + 1))
    which = np.clip(np.searchsorted(edges, l, side="right") - 1, 0, N_BINS - 1)
    bins = [
        {"loss_lo": float(edges[i]), "loss_hi": float(edges[i + 1]), "mean_active": float(c[which == i].mean()),
         "tokens": int(np.sum(which == i))}
        for i in range(N_BINS) if np.any(which == i)
    ]
    return {
        "spearman": spearman(c, l), "tokens": int(len(c)), "mean_active": float(c.mean()),
        "mean_active_all_positions": float(counts.mean()), "loss_bins": bins,
    }


def mqar_settings(data_cfg, vocab_size: int) -> dict[str, int]:
    """Easy and hard pair counts at the trained length: kv//4 (>= 1) and 2*kv (clipped to what fits)."""
    kv, length = probe_settings(data_cfg).num_kv_pairs, data_cfg.seq_len
    hard = min(2 * kv, length // 4, vocab_size // 2 - 1)
    return {"easy": max(1, kv // 4), "hard": max(hard, 1)}


def dynamic_analysis(model, task, data_cfg, batch_size: int, plot_path: Path | None = None) -> dict:
    """Per-token active count vs loss on the task's eval data, plus MQAR easy vs hard."""
    capture = make_capture_forward(model)
    unit, _ = analysis_units(model)
    per_unit = 1 if unit == "neuron" else model.blocks[0].ffn.w_up.shape[2]  # expert width
    first_set = next(iter(task.eval_sets(batch_size).values()))
    out = {"unit": unit, "neurons_per_unit": per_unit,
           data_cfg.task: summarize(*counts_and_losses(capture, first_set, per_unit))}
    vocab = model.vocab_size - model.vocab_size % 2
    for name, kv in mqar_settings(data_cfg, vocab).items():
        try:
            check_mqar(data_cfg.seq_len, vocab, kv, probe_settings(data_cfg).power_a)
        except UserError as e:
            out[f"mqar_{name}"] = {"skipped": str(e)}
            continue
        rng = np.random.default_rng((0xD1CE, kv))
        batches = []
        for _ in range(data_cfg.eval_batches):
            inputs, labels = mqar_batch(rng, batch_size, data_cfg.seq_len, vocab, kv, probe_settings(data_cfg).power_a)
            batches.append({"inputs": inputs, "labels": labels})
        out[f"mqar_{name}"] = {"num_kv_pairs": kv, **summarize(*counts_and_losses(capture, batches, per_unit))}
    if plot_path is not None:
        plot(out, plot_path)
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for name, entry in result.items():
        if isinstance(entry, dict) and "loss_bins" in entry:
            mids = [(b["loss_lo"] + b["loss_hi"]) / 2 for b in entry["loss_bins"]]
            left.plot(mids, [b["mean_active"] for b in entry["loss_bins"]], marker="o",
                      label=f"{name} (Spearman {entry['spearman']:.2f})")
    left.set(xlabel="per-token loss (decile midpoint, nats)", ylabel="active neurons per layer",
             title="active neurons vs token difficulty")
    left.legend(fontsize=8)
    names = [n for n in result if n.startswith("mqar_") and "mean_active_all_positions" in result[n]]
    right.bar(names, [result[n]["mean_active_all_positions"] for n in names])
    right.set(ylabel="active neurons per layer (all positions)", title="MQAR easy vs hard")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
