"""`cfm-jax eval`: measure a trained workdir and write workdir/eval.json.

eval.json holds the parameter counts, and for each evaluation set of the task (text: "val";
synthetic tasks: one set per context length, "len128", ...) the mean loss over scored tokens, the
accuracy of the argmax prediction at scored positions, and for byte-level text bits per byte
(= loss / ln 2, since one token is one byte). `metrics` repeats these flat as "SET/NAME".
"""

from __future__ import annotations

import functools
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cfm_jax import provenance
from cfm_jax import workdir as wd
from cfm_jax.data import IGNORE, make_task
from cfm_jax.errors import UserError
from cfm_jax.harness.bricks import bricks_analysis
from cfm_jax.harness.cett import cett_analysis
from cfm_jax.harness.dynamic import dynamic_analysis
from cfm_jax.harness.neurons import has_experts, has_neurons
from cfm_jax.layers.model import efficiency, param_counts
from cfm_jax.layers.precision import compute_view
from cfm_jax.train import cross_entropy, restore_model


@functools.lru_cache(maxsize=4)  # validation during training calls it with one graphdef many times
def _make_eval_step(graphdef):
    @jax.jit
    def eval_step(state, batch):
        model = nnx.merge(graphdef, state)
        positions = batch.get("positions")  # a task that scores few positions: the head runs only there
        logits, aux = model(batch["inputs"], positions=positions)
        labels = batch["labels"] if positions is None else jnp.take_along_axis(batch["labels"], positions, axis=1)
        ce_sum, correct, n = cross_entropy(logits, labels)
        mask = labels != IGNORE
        right = (jnp.argmax(logits, axis=-1) == labels) | ~mask
        scored = jnp.any(mask, axis=1)  # sequences with at least one scored token
        seq_correct = jnp.sum(jnp.all(right, axis=1) & scored)
        return {"ce_sum": ce_sum, "correct": correct, "n": n, "seq_correct": seq_correct,
                "seqs": jnp.sum(scored)}, aux["stats"]

    return eval_step


def evaluate_sets(model, task, eval_sets: dict) -> tuple[dict, dict]:
    """Returns ({set: {loss, accuracy, sequence_accuracy, tokens[, bits_per_byte]}},
    {stat: mean over eval batches}). sequence_accuracy: share of sequences whose scored tokens are
    all predicted right (exact match / RULER's string_match_all under teacher forcing). Runs in the
    model's compute dtype (model.dtype), as training does."""
    graphdef, state = nnx.split(model)
    state = compute_view(state, model.cfg.dtype)
    eval_step = _make_eval_step(graphdef)
    results, stats_sum, stats_n = {}, {}, 0
    for name, batches in eval_sets.items():
        ce, correct, n, seq_correct, seqs = 0.0, 0, 0, 0, 0
        for batch in batches:
            out, stats = eval_step(state, {k: jnp.asarray(v) for k, v in batch.items()})
            ce += float(out["ce_sum"])
            correct += int(out["correct"])
            n += int(out["n"])
            seq_correct += int(out["seq_correct"])
            seqs += int(out["seqs"])
            for k, v in stats.items():
                stats_sum[k] = stats_sum.get(k, 0.0) + float(v)
            stats_n += 1
        loss = ce / max(n, 1)
        entry = {"loss": loss, "accuracy": correct / max(n, 1), "sequence_accuracy": seq_correct / max(seqs, 1),
                 "tokens": n}
        if task.bytes_per_token and name == "val":  # text: bits per byte, comparable across tokenizers
            entry["bits_per_byte"] = loss / math.log(2) / task.bytes_per_token
        results[name] = entry
    return results, {k: v / stats_n for k, v in stats_sum.items()}


ANALYSES = ("cett", "dynamic", "bricks")


def evaluate(workdir: Path, analyses: tuple[str, ...] = ()) -> dict:
    """Evaluate the workdir's latest checkpoint; write and return eval.json's content.

    analyses: any of ANALYSES (neuron analyses; extra forward passes): "cett" -> CETT-PPL-1%,
    "dynamic" -> active neurons vs token loss, "bricks" -> skill specialization and clustering.
    """
    unknown = [a for a in analyses if a not in ANALYSES]
    if unknown:
        raise UserError(f"unknown analysis {unknown[0]!r}; allowed: {', '.join(ANALYSES)}, all")
    workdir = Path(workdir)
    cfg = wd.load_config(workdir)
    task = make_task(cfg.data)
    model, step = restore_model(workdir, cfg, task.vocab_size)
    t0 = time.perf_counter()
    eval_sets = task.eval_sets(cfg.train.batch_size)  # generated once, shared by everything below
    first_set = next(iter(eval_sets.values()))
    sets, stats = evaluate_sets(model, task, eval_sets)
    lengths = {int(name[3:]): entry for name, entry in sets.items() if name[3:].isdigit()}
    result = {
        "step": step,
        "task": cfg.data.task,
        "tokens_trained": step * cfg.train.batch_size * cfg.data.seq_len,
        **param_counts(model),
        "sets": sets,
        "metrics": {f"{s}/{k}": v for s, entry in sets.items() for k, v in entry.items() if k != "tokens"},
        "stats": stats,
        **efficiency(model, stats, cfg.data.seq_len),
        "state_bytes": {str(n): state_bytes(model, n) for n in sorted({cfg.data.seq_len, *lengths})},
        "eval_seconds": round(time.perf_counter() - t0, 3),
        "device": f"{jax.default_backend()}: {jax.devices()[0].device_kind}",
        "provenance": provenance.provenance(cfg),
    }
    # One number per run for picking a learning rate over several sets (MQAR's per-pair-count sets)
    result["metrics"]["mean_accuracy"] = sum(entry["accuracy"] for entry in sets.values()) / len(sets)
    if hasattr(task, "corpus"):
        result["corpus"] = {"fingerprint": task.corpus.fingerprint, "files": task.corpus.n_files,
                            "train_bytes": int(len(task.corpus.train)), "val_bytes": int(len(task.corpus.val)),
                            **getattr(task, "tokenizer_info", {}), "bytes_per_token": task.bytes_per_token}
    horizons = memory_horizons(model, first_set[0]["inputs"])
    if horizons:
        result["memory_horizon"] = horizons
    if lengths and not task.bytes_per_token:
        result["effective_length"] = effective_length(lengths, cfg.data.effective_threshold)
        result["metrics"]["effective_length"] = result["effective_length"]
    for name in analyses:
        result[name] = _run_analysis(name, model, task, cfg, workdir, first_set)
    wd.write_json(workdir / wd.EVAL, _jsonable(result))
    return result


def state_bytes(model, context_len: int) -> int:
    """Decoding state per sequence (KV caches, recurrent states) summed over layers, in bytes."""
    return int(sum(block.mixer.state_bytes(context_len) for block in model.blocks))


def memory_horizons(model, tokens, threshold: float = 0.01) -> dict:
    """Per gated-recurrent layer, the distance (tokens) at which the mean retained fraction of its
    state falls below `threshold`, read from the decays the layer computes on its actual inputs for
    `tokens` (see each mixer's memory_horizon); plus the mean over those layers."""
    h = model.embed(jnp.asarray(tokens))
    out = {}
    for i, block in enumerate(model.blocks):
        if hasattr(block.mixer, "memory_horizon"):
            out[f"layer{i}"] = float(block.mixer.memory_horizon(threshold, block.mixer_norm(h)))
        h, _ = block(h)
    if out:
        out["mean"] = float(np.mean(list(out.values())))
    return out


def effective_length(by_length: dict[int, dict], threshold: float) -> int:
    """RULER: the longest evaluated length up to which every length's accuracy is >= threshold
    (0 if the shortest already falls below)."""
    best = 0
    for length in sorted(by_length):
        if by_length[length]["accuracy"] < threshold:
            break
        best = length
    return best


def _run_analysis(name: str, model, task, cfg, workdir: Path, first_set: list[dict]) -> dict:
    # dynamic and bricks also run at expert granularity (MoE); CETT needs neurons.
    if not (has_neurons(model) or (name != "cett" and has_experts(model))):
        return {"skipped": f"ffn kind {cfg.model.ffn.kind!r} exposes no neurons (hidden/down)"}
    batch_size = cfg.train.batch_size
    if name == "cett":
        return cett_analysis(model, first_set)
    if name == "dynamic":
        return dynamic_analysis(model, task, cfg.data, batch_size, plot_path=workdir / "dynamic_activation.png")
    return bricks_analysis(model, task, cfg.data, batch_size)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None  # strict JSON has no NaN / inf
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    return obj
