"""MQAR capacity (Zoology fig. 2 at small scale): recall accuracy vs model width, per mixer and length.

Command:  cfm-jax sweep mqar_capacity --scale cpu && cfm-jax report mqar_capacity --scale cpu
Runtime:  smoke ~3 min (6 mixers, 1 width, 1 length, 3 seeds, 30 steps); cpu: 6 mixers x 2 widths x
          2 (length, pairs) x 3 seeds x 1000 steps at a 64-token vocabulary, about 45 min on 2 cores
          (two sweeps with --shard 0/2 and 1/2, one per core); full: 4 widths, 4 lengths, 8192 tokens.
          The cpu shapes are small because of what a 2-layer d=64 attention model learns in a CPU
          budget (measured while sizing this file, lr 3e-3, batch 64): 3 pairs at 24, 32 or 48 tokens
          reach loss < 0.01 within 1500 steps, while 4 pairs at 32 or 64 tokens stay at chance (loss
          ln 4) for 2500 steps, at lr 3e-3 and 1e-2 alike.
Sizing for the redesign (single seed-0 probes, attention d 64, 2 layers, batch 64, lr 3e-3; not a
          table): 2 pairs in 16 tokens at vocabulary 64 are learned in ~300 steps with Zoology's filler
          (0.94 at step 300, 0.99 at 1000) but NOT with `data.mqar_filler=nonkey` (0.54, chance 0.5,
          after 1500 steps); the same at vocabulary 256 (Zoology's filler 0.89 at step 400, 0.98 at
          1000; nonkey 0.53 at 1000) and 1024 (nonkey 0.63 at 1000, rising). Filler from the whole
          vocabulary less the sequence's bound keys (`data.mqar_filler=unbound`, no stray bound key) is
          learned as fast as Zoology's (0.91 at step 400, vocabulary 256); filler from either half
          of the vocabulary, or zeros, is not (0.53-0.54 at 1000). The redesign should use `unbound`;
          at vocabulary 4096 (8 pairs, 64 tokens) `unbound` reached 0.32 after 2000 steps against
          nonkey's 0.24 (both rising): there the value embeddings are the slow part; at vocabulary 4096 with nonkey filler, 8 pairs in 64 tokens reach 0.24
          after 2000 steps (~5 min), rising; tied embeddings were slower (0.10). A Zoology-sized grid
          (vocabulary >= 4096, up to 64 pairs, 3 widths, 6 mixers, 3 seeds) therefore needs far more
          than the 8 CPU-hours budget at these step counts; why the nonkey filler slows learning at a
          small vocabulary is not understood yet.
          Later probes (2026-12-07, same model, unbound filler, validation every 250 steps): the earlier
          2000-step runs decayed their learning rate too soon. With a 4000-step cosine schedule attention
          at vocabulary 4096, 64 tokens learns both 4 and 8 pairs: accuracy 0.02 / 0.01 at step 1000,
          0.89 / 0.92 at 2000, 0.98 / 0.98 at 4000 (seed 0, ~340 s per run with two runs sharing the 2
          cores). lr 1e-2 did not learn 8 pairs (0.00 at 1750 steps), and vocabulary 256 with 8 pairs in
          64 tokens stayed at chance (0.13-0.14 for 2000 steps of a 3000-step run). A Zoology-sized grid
          at one length is therefore within reach at d_model 64 (~6 core-minutes per run); widths 128
          and 256 and lengths past 64 multiply that, which the redesign has to budget. The fixed-state
          mixers are the obstacle, not the cost: at the same setting (8 pairs, vocabulary 4096, 4000
          steps) Mamba and GLA with a 4-tap short convolution never left the uniform-over-values plateau
          (loss 7.63 = ln 2048, accuracy 0.00) at lr 3e-3, nor did Mamba at d_model 128 (3250 steps);
          Mamba at lr 1e-3 began to move (loss 6.77 at 4000 steps, accuracy 0.01). Attention left the
          plateau at step ~1000-1500 (loss 7.23 -> 0.80 by step 2000). A capacity table needs the
          fixed-state mixers trained past that plateau first (lr grid, longer runs), else it measures
          trainability again. Two more probes: Based's block (model.mixer=based_linear: Taylor feature
          map, 3-tap short convolution) learns the same setting faster than attention (0.98 at step
          1000, 1.00 from step 2000); Mamba at lr 1e-3 on an 8000-step schedule climbs slowly (accuracy
          0.05 at 4000, 0.09 at 8000; loss 5.17), about 17 minutes per run with two runs sharing the cores.
Expected: attention near 1 at every width; fixed-state mixers (linear attention, GLA, Mamba, RWKV,
          sliding window below the context) fall off as key-value pairs grow at fixed width and need
          width that grows with the length (Zoology).
"""

import re

from cfm_jax.harness.plots import grouped_lines, parse_cell

MIXERS = {"attention": [], "sliding_window": ["model.mixer.window=8"], "linear_attention": [], "gla": [],
          "mamba": [], "rwkv": []}
SIZES = {
    "smoke": dict(widths=(32,), shapes=((64, 4),), steps=30, vocab=512, batch=32),
    "cpu": dict(widths=(32, 64), shapes=((16, 2), (32, 3)), steps=1000, vocab=64, batch=64),
    "full": dict(widths=(64, 128, 256, 512), shapes=((64, 4), (128, 8), (256, 16), (512, 64)), steps=5000,
                 vocab=8192, batch=64),
}
SEEDS = 3


def cells(scale):
    s = SIZES[scale]
    out = {}
    for mixer, extra in MIXERS.items():
        for d in s["widths"]:
            for length, kv in s["shapes"]:
                out[f"{mixer}-d{d}-L{length}"] = [
                    "data.task=mqar", f"data.vocab_size={s['vocab']}", f"data.seq_len={length}", f"data.num_kv_pairs={kv}",
                    f"data.eval_lengths={length}", f"model.d_model={d}", "model.n_layers=2", f"model.mixer={mixer}",
                    *extra, f"train.batch_size={s['batch']}", f"train.steps={s['steps']}", "train.lr=3e-3",
                    "train.warmup_steps=50", "train.checkpoint_every=1000",
                ]
    return out


def COLUMNS(scale):
    shapes = SIZES[scale]["shapes"]
    return [f"len{n}/accuracy" for n, _ in shapes] + [f"state_bytes/{n}" for n, _ in shapes]


def _accuracy(row):
    return row.get(f"len{parse_cell(row['cell'])['L']}/accuracy")


def _std(row):
    return row.get(f"len{parse_cell(row['cell'])['L']}/accuracy_std")


def plot(table, path):
    grouped_lines(table, x=lambda r: float(parse_cell(r["cell"])["d"]), y=_accuracy, ystd=_std,
                  group=lambda r: parse_cell(r["cell"])["kind"], panels=lambda r: "L=" + parse_cell(r["cell"])["L"],
                  path=path, xlabel="model width d_model", ylabel="MQAR accuracy", title="MQAR", logx=True)


def reading(table, tests=()):
    acc = {}  # kind -> {(length, width): accuracy}
    for r in table:
        if _accuracy(r) is not None:
            p = parse_cell(r["cell"])
            acc.setdefault(p["kind"], {})[(int(p["L"]), int(p["d"]))] = _accuracy(r)
    if not acc:
        return "No finished cells."
    lengths = sorted({n for pts in acc.values() for n, _ in pts})
    widths = sorted({d for pts in acc.values() for _, d in pts})
    pairs = {int(parse_cell(r["cell"])["L"]): int(re.search(r"num_kv_pairs=(\d+)", r["command"]).group(1))
             for r in table if "num_kv_pairs=" in r.get("command", "")}
    lines, at_chance = [], []
    if pairs:
        chance = {n: 1 / k for n, k in pairs.items()}
        at_chance = sorted(k for k, pts in acc.items()
                           if all(v < chance.get(n, 0) + 0.05 for (n, _), v in pts.items()))
        lines += ["Chance, guessing among the sequence's values, is " + ", ".join(
            f"1/{pairs[n]} at length {n}" for n in sorted(pairs)) + "; at chance in every cell (did not learn "
            "the task in this budget): " + (", ".join(at_chance) if at_chance else "none") + ".", ""]
    for n in lengths:
        best = {k: max(v for (m, _), v in pts.items() if m == n) for k, pts in acc.items() if any(m == n for m, _ in pts)}
        lines.append(f"- Length {n}: best accuracy over widths, highest first: "
                     + ", ".join(f"{k} {best[k]:.2f}" for k in sorted(best, key=best.get, reverse=True)) + ".")
    att = acc.get("attention", {})
    low = [f"width {d}, length {n}: {v:.2f}" for (n, d), v in sorted(att.items()) if v <= 0.9]
    lines += ["", "Attention stays near 1 at every width and length, as in Zoology." if att and not low else
              "Attention does NOT reach near-perfect recall everywhere here (" + "; ".join(low) + "): at this "
              "budget the narrow model has not learned the task, so that part of the Zoology figure is not "
              "reproduced."]
    if len(lengths) > 1 and len(widths) > 1:
        short, long_, narrow, wide = lengths[0], lengths[-1], widths[0], widths[-1]
        falls, grows = [], []
        for k, pts in acc.items():
            if k == "attention" or k in at_chance:  # chance itself falls with more pairs
                continue
            if (short, wide) in pts and (long_, wide) in pts and pts[(long_, wide)] < pts[(short, wide)] - 0.05:
                falls.append(f"{k} {pts[(short, wide)]:.2f} -> {pts[(long_, wide)]:.2f}")
            if (long_, narrow) in pts and (long_, wide) in pts and pts[(long_, wide)] > pts[(long_, narrow)] + 0.05:
                grows.append(f"{k} {pts[(long_, narrow)]:.2f} -> {pts[(long_, wide)]:.2f}")
        lines.append(f"Fixed-state mixers whose accuracy falls from length {short} to {long_} (more key-value pairs) "
                     f"at width {wide}: " + (", ".join(falls) if falls else "none") + ".")
        lines.append(f"Mixers whose accuracy at length {long_} rises with width {narrow} -> {wide}: "
                     + (", ".join(grows) if grows else "none") + ". Zoology predicts both for every fixed-state "
                     "mixer (mixers at chance are left out of both lists).")
        keep = [k for k, pts in acc.items() if k != "attention" and pts.get((long_, wide), 0) >= 0.9]
        if keep:
            lines.append(f"Fixed-state mixers that keep >= 0.9 at length {long_}, width {wide}: {', '.join(keep)}: at "
                         f"{pairs.get(long_, '?')} pairs their state still suffices, so the fall-off Zoology shows "
                         "at many more pairs is not reached here.")
    return "\n".join(lines)
