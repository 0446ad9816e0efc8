"""Emergent bricks (CFM sections 4.4-4.5): do neurons specialize by skill, and do they co-activate in
clusters that could serve as experts (MoEfication)?

Skills are labelled example sets at the model's vocabulary and length: `text` (held-out windows of
the byte corpus, when the vocabulary holds bytes), `mqar` (associative recall) and `copy` (a random
string, a separator, then the string again; the copy is scored).

- FuncScore(n, skill): average precision of ranking all examples by neuron n's mean |activation|
  over the example, with the skill's examples as positives.
- Top-5 % overlap: |top(s) & top(s')| / |top(s)| over each skill's top 5 % neurons per layer.
- Cross-pruning: loss on each skill after zeroing another skill's top-5 % neurons, as a ratio to the
  unpruned loss, next to pruning the same number of random neurons.
- Co-activation clustering: neurons of each layer split into equal groups by balanced k-means on
  their co-activation profiles, fitted on half of each skill's batches; the share of a held-out
  token's active neurons that falls in its top-2 groups, against a random equal-size partition (what
  MoEfication exploits). `clustered_fit` is the same share on the fitted tokens (the in-sample number).

For a MoE model the unit is the expert (the hook sees its combine weight per token): FuncScore,
top-5 % overlap (at least one expert) and cross-pruning are computed the same way; clustering is
skipped (the experts are the groups).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from cfm_jax.data import IGNORE
from cfm_jax.data.copying import repeat_copy_batch as copy_batch
from cfm_jax.data.mqar import mqar_batch, probe_settings
from cfm_jax.harness.neurons import analysis_units, make_capture_forward, make_masked_forward, mean_loss

TOP_FRACTION = 0.05
N_GROUPS = 8
TOP_GROUPS = 2


def skill_batches(task, data_cfg, vocab_size: int, batch_size: int) -> dict[str, list[dict]]:
    rng = np.random.default_rng(0xB41C)
    n, length = data_cfg.eval_batches, data_cfg.seq_len
    skills = {}
    if vocab_size >= 256:
        from cfm_jax.data.text import TextTask

        text = task if task.name == "text" else TextTask(data_cfg)
        skills["text"] = next(iter(text.eval_sets(batch_size).values()))
    kv = max(1, min(probe_settings(data_cfg).num_kv_pairs, length // 4, vocab_size // 2 - 1))
    v = vocab_size - vocab_size % 2
    skills["mqar"] = [dict(zip(("inputs", "labels"), mqar_batch(rng, batch_size, length, v, kv))) for _ in range(n)]
    skills["copy"] = [copy_batch(rng, batch_size, length, vocab_size) for _ in range(n)]
    return skills


def average_precision(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """AP of ranking examples by each column of scores (examples, neurons) against positive (examples,)."""
    order = np.argsort(-scores, axis=0, kind="stable")  # (examples, neurons)
    hits = positive[order].astype(np.float64)
    precision = np.cumsum(hits, axis=0) / np.arange(1, len(positive) + 1)[:, None]
    return np.sum(precision * hits, axis=0) / max(positive.sum(), 1)


def balanced_kmeans(features: np.ndarray, groups: int, iters: int = 10, seed: int = 0) -> np.ndarray:
    """Equal-size clusters of rows of features (n, k): n // groups per cluster (remainder spread)."""
    n = len(features)
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % groups)
    capacity = np.bincount(np.arange(n) % groups, minlength=groups)
    x = features / (np.linalg.norm(features, axis=1, keepdims=True) + 1e-9)
    for _ in range(iters):
        centroids = np.stack([x[labels == g].mean(0) for g in range(groups)])
        sim = x @ centroids.T  # (n, groups)
        new = np.full(n, -1)
        left = capacity.copy()
        for flat in np.argsort(-sim, axis=None):  # greedy: best (neuron, group) pairs first
            i, g = divmod(int(flat), groups)
            if new[i] < 0 and left[g] > 0:
                new[i], left[g] = g, left[g] - 1
        if np.array_equal(new, labels):
            break
        labels = new
    return labels


def top_group_share(active: np.ndarray, labels: np.ndarray, groups: int, top: int) -> float:
    """Mean over tokens (with any active neuron) of the share of active neurons in its top groups."""
    per_group = np.stack([active[:, labels == g].sum(1) for g in range(groups)], 1)  # (tokens, groups)
    total = per_group.sum(1)
    ok = total > 0
    best = np.sort(per_group, axis=1)[:, -top:].sum(1)
    return float(np.mean(best[ok] / total[ok])) if ok.any() else float("nan")


def bricks_analysis(model, task, data_cfg, batch_size: int) -> dict:
    capture = make_capture_forward(model)
    masked = make_masked_forward(model)
    skills = skill_batches(task, data_cfg, model.vocab_size, batch_size)
    names = list(skills)
    unit, d_ff = analysis_units(model)  # d_ff: units per layer (neurons, or experts for MoE)
    n_layers = len(model.blocks)

    # Mean |activation| per example, neuron: (examples, layers * d_ff); activity per token for clustering.
    scores, labels, tokens_active = [], [], [[] for _ in range(n_layers)]
    for s, name in enumerate(names):
        for batch in skills[name]:
            _, _, captured = capture(jnp.asarray(batch["inputs"]), jnp.asarray(batch["labels"]))
            scores.append(np.concatenate([np.asarray(jnp.mean(jnp.abs(a), axis=1)) for a in captured], axis=1))
            labels.extend([s] * batch["inputs"].shape[0])
            for layer, a in enumerate(captured):
                tokens_active[layer].append(np.asarray(a != 0).reshape(-1, d_ff))
    scores, labels = np.concatenate(scores), np.asarray(labels)

    func = np.stack([average_precision(scores, labels == s) for s in range(len(names))])  # (skills, L*F)
    func = func.reshape(len(names), n_layers, d_ff)
    k = max(1, int(round(TOP_FRACTION * d_ff)))
    top = np.argsort(-func, axis=2)[:, :, :k]  # (skills, layers, k)
    top_sets = [[set(top[s, l]) for l in range(n_layers)] for s in range(len(names))]
    overlap = [[float(np.mean([len(top_sets[a][l] & top_sets[b][l]) / k for l in range(n_layers)]))
                for b in range(len(names))] for a in range(len(names))]

    base = {name: mean_loss(masked, skills[name], jnp.ones((n_layers, d_ff))) for name in names}

    def pruned_ratio(keep: np.ndarray) -> dict:
        return {name: mean_loss(masked, skills[name], jnp.asarray(keep)) / base[name] for name in names}

    cross = {}
    for s, name in enumerate(names):
        keep = np.ones((n_layers, d_ff), np.float32)
        for l in range(n_layers):
            keep[l, top[s, l]] = 0.0
        cross[name] = pruned_ratio(keep)
    rng = np.random.default_rng(0)
    keep = np.ones((n_layers, d_ff), np.float32)
    for l in range(n_layers):
        keep[l, rng.choice(d_ff, k, replace=False)] = 0.0
    cross["random"] = pruned_ratio(keep)

    clustering = []
    groups = min(N_GROUPS, d_ff)
    for layer in range(n_layers if unit == "neuron" else 0):  # experts are already the groups
        # Fit the groups on the even batches of every skill, score them on the odd (held-out) ones.
        fit = np.concatenate(tokens_active[layer][0::2]).astype(np.float32)
        held_out = np.concatenate(tokens_active[layer][1::2]).astype(np.float32)
        learned = balanced_kmeans(fit.T @ fit, groups, seed=layer)  # on (d_ff, d_ff) co-activation counts
        random = np.random.default_rng(layer).permutation(np.arange(d_ff) % groups)
        clustering.append({"layer": layer, "clustered": top_group_share(held_out, learned, groups, TOP_GROUPS),
                           "clustered_fit": top_group_share(fit, learned, groups, TOP_GROUPS),
                           "random": top_group_share(held_out, random, groups, TOP_GROUPS)})

    coact = ({key: float(np.mean([c[key] for c in clustering])) for key in ("clustered", "clustered_fit", "random")}
             | {"per_layer": clustering} if clustering else None)
    return {
        "unit": unit, "units_per_layer": int(d_ff), "top_units_per_layer": int(k),
        "skills": names,
        "examples_per_skill": {name: int(np.sum(labels == s)) for s, name in enumerate(names)},
        "funcscore_mean_top5pct": {name: float(np.mean(np.sort(func[s], axis=1)[:, -k:])) for s, name in enumerate(names)},
        "top5pct_overlap": {a: dict(zip(names, row)) for a, row in zip(names, overlap)},
        "base_loss": base,
        "prune_loss_ratio": cross,  # prune_loss_ratio[pruned skill][evaluated skill]
        "coactivation_top2_of_8_share": coact,
    }


def skills_learned(table, skills=("mqar", "copy"), at: float = 0.5) -> str:
    """A sentence naming, per skill, the cells whose mean accuracy on it reached `at` (learned) and
    those that did not: an analysis of a skill the model never learned does not test CFM's claims."""
    parts = []
    for skill in skills:
        learned = [r["cell"] for r in table if (r.get(f"{skill}/accuracy") or 0) >= at]
        missed = [f"{r['cell']} {r[f'{skill}/accuracy']:.2f}" for r in table
                  if r.get(f"{skill}/accuracy") is not None and r[f"{skill}/accuracy"] < at]
        parts.append(f"{skill}: learned (mean accuracy >= {at}) by {', '.join(learned) or 'no model'}"
                     + (f"; not learned by {', '.join(missed)}" if missed else ""))
    return ("Trained skills: " + "; ".join(parts) + ". Rows about a skill a model did not learn describe an "
            "untrained skill and do not test CFM's claims.")


def mix_cells(variants: dict[str, list[str]], d: int, layers: int, steps: int) -> dict[str, list[str]]:
    """Cells of the experiments that analyse trained skills (bricks, dynamic_activation): each variant's
    overrides ({f}: the neuron-sparse width 4d, {e}: the expert width 4d/8) trained on data.task=mix."""
    f = 4 * d
    return {name: [*(o.format(f=f, e=f // 8) for o in opts), "data.task=mix", f"model.d_model={d}",
                   f"model.n_layers={layers}", f"train.steps={steps}", "train.batch_size=16", "data.seq_len=128",
                   "data.num_kv_pairs=8", "data.eval_batches=4", "train.checkpoint_every=1000",
                   f"train.eval_every={max(1, steps // 8)}"]
            for name, opts in variants.items()}
