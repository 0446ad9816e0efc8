"""Long-context suite: every mixer kind and two hybrids on the whole task suite, accuracy vs length
(training length and 2x, 4x, 8x beyond), with state bytes and RULER's effective length.

Command:  cfm-jax sweep long_context --scale cpu && cfm-jax report long_context --scale cpu
Runtime:  smoke ~5 min (9 models x 4 tasks, 20 steps); cpu: 9 models x 2 tasks (passkey, single
          needle) x 3 seeds at 64 tokens, 600 steps each, about 40 min on 2 cores with one --shard per
          core (estimated from the MQAR sweeps' cell times); full: 9 models x 9 tasks at 512 tokens.
          A d=64 2-layer attention model learns passkey and single-needle retrieval at 64 tokens in
          600 steps (accuracy 1.00, measured), and variable tracking (0.96), but not multi-key needles
          (0.12), so the cpu scale keeps the first two.
Expected: attention retrieves at the training length and degrades past it (RoPE extrapolation);
          sliding window fails needles beyond its window; fixed-state mixers fall off with length; the
          hybrids recover much of attention's recall.
"""

from cfm_jax.config import layer_pattern
from cfm_jax.harness.plots import grouped_lines

MIXERS = ("attention", "sliding_window", "mla", "linear_attention", "gla", "mamba", "rwkv")
HYBRIDS = {  # name -> layer pattern
    "smoke": {"hybrid_gla": "gla*3+attention", "hybrid_jamba": "jamba"},
    # cpu: Jamba's 1 attention : 7 Mamba takes 8 layers of 7 Mamba scans per step, over this scale's
    # budget; 3 : 1 keeps the idea (mostly Mamba, one attention layer) at 4 layers.
    "cpu": {"hybrid_gla": "gla*3+attention", "hybrid_mamba": "mamba*3+attention"},
    "full": {"hybrid_gla": "gla*3+attention", "hybrid_jamba": "jamba"},
}
TASKS = {
    "smoke": ("mqar", "niah_single", "passkey", "selective_copying"),
    # cpu: the tasks a d=64 model learns within its budget; full: the whole suite.
    "cpu": ("passkey", "niah_single"),
    "full": ("mqar", "niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "passkey",
             "variable_tracking", "selective_copying", "copying"),
}
SIZES = {"smoke": dict(d=32, layers=2, L=64, steps=20, window=16), "cpu": dict(d=64, layers=2, L=64, steps=600, window=16),
         "full": dict(d=256, layers=8, L=512, steps=5000, window=64)}  # jamba hybrids always use 8 layers
SEEDS = 3
COLUMNS_LENGTHS = (1, 2, 4, 8)


def cells(scale):
    s = SIZES[scale]
    L = s["L"]
    out = {}
    models = {name: ([f"model.mixer={name}"], s["layers"]) for name in MIXERS}
    for name, pattern in HYBRIDS[scale].items():  # tiled to the scale's depth if it is whole periods
        period = len(layer_pattern(pattern))
        models[name] = (["model.mixer=attention", f"model.layers={pattern}"], s["layers"] if s["layers"] % period == 0 else period)
    for name, (mixer, n_layers) in models.items():
        # a window of L/4: needles further back are out of reach
        extra = [f"model.mixer.window={s['window']}"] if name == "sliding_window" else []
        for task in TASKS[scale]:
            out[f"{name}-{task}"] = [
                f"data.task={task}", "data.vocab_size=64", f"data.seq_len={L}",
                "data.eval_lengths=" + ",".join(str(L * k) for k in COLUMNS_LENGTHS), "data.eval_depths=0",
                f"model.d_model={s['d']}", f"model.n_layers={n_layers}", *mixer, *extra, "train.batch_size=32",
                f"train.steps={s['steps']}", "train.lr=3e-3", "train.checkpoint_every=1000",
            ]
    return out


def COLUMNS(scale):
    L = SIZES[scale]["L"]
    return ([f"len{L * k}/accuracy" for k in COLUMNS_LENGTHS] + ["effective_length"]
            + [f"state_bytes/{L * k}" for k in (COLUMNS_LENGTHS[0], COLUMNS_LENGTHS[-1])])


def _split(cell):
    mixer, task = cell.split("-", 1)
    return mixer, task


def plot(table, path):
    def points(r):
        return [(int(k[3:].split("/")[0]), v) for k, v in r.items() if k.startswith("len") and k.endswith("/accuracy")]

    rows = []
    for r in table:
        for length, acc in points(r):
            rows.append({"mixer": _split(r["cell"])[0], "task": _split(r["cell"])[1], "L": length, "acc": acc})
    grouped_lines(rows, x=lambda r: r["L"], y=lambda r: r["acc"], group=lambda r: r["mixer"],
                  panels=lambda r: r["task"], path=path, xlabel="context length", ylabel="accuracy",
                  title="", logx=True)


def _accuracy_by_length(row):
    """{length: accuracy} of one table row."""
    return {int(k[3:].split("/")[0]): v for k, v in row.items()
            if k.startswith("len") and k.endswith("/accuracy") and v is not None}


def reading(table):
    per_mixer = {}  # mixer -> [(task, {length: accuracy}, effective length)]
    for r in table:
        acc = _accuracy_by_length(r)
        if acc:
            mixer, task = _split(r["cell"])
            per_mixer.setdefault(mixer, []).append((task, acc, r.get("effective_length")))
    if not per_mixer:
        return "No finished cells."
    lengths = sorted({n for runs in per_mixer.values() for _, acc, _ in runs for n in acc})
    train, longest = lengths[0], lengths[-1]
    mean = lambda xs: sum(xs) / len(xs)
    at = {m: {n: mean([acc[n] for _, acc, _ in runs if n in acc]) for n in lengths} for m, runs in per_mixer.items()}
    eff = {m: mean([e or 0 for _, _, e in runs]) for m, runs in per_mixer.items()}
    ranked = sorted(per_mixer, key=lambda m: (at[m][train], eff[m]), reverse=True)
    lines = [f"Mean over tasks of the accuracy at the training length {train} -> {longest} tokens, and the mean "
             "effective length (longest evaluated length with accuracy >= the threshold; 0 = none):", ""]
    lines += [f"- {m}: {at[m][train]:.2f} -> {at[m][longest]:.2f}, effective length {eff[m]:.0f}" for m in ranked]
    learned = [m for m in ranked if at[m][train] >= 0.9]
    lines += ["", f"{len(learned)} of {len(ranked)} models reach >= 0.9 at the training length"
              + (f" ({', '.join(learned)})." if learned else ".")]
    if "attention" in at:
        a = at["attention"]
        lines.append(f"Attention {a[train]:.2f} at {train} tokens and {a[longest]:.2f} at {longest}: "
                     + ("it degrades beyond the training length, as expected of RoPE extrapolation."
                        if a[longest] < a[train] - 0.1 else "no degradation beyond the training length here."))
    if "sliding_window" in at and "attention" in at:
        sw = at["sliding_window"][train]
        lines.append(f"Sliding window {sw:.2f} at the training length against attention's {at['attention'][train]:.2f}: "
                     + ("needles beyond its window are out of reach, as expected." if sw < at["attention"][train] - 0.1
                        else "no loss from the window here (the model solved the task within it or neither did)."))
    hybrids = [m for m in at if m.startswith("hybrid")]
    pure = [m for m in at if m not in hybrids and m not in ("attention", "mla", "sliding_window")]
    if hybrids and pure:
        best_pure = max(pure, key=lambda m: at[m][train])
        for h in hybrids:
            lines.append(f"{h}: {at[h][train]:.2f} at the training length against {at[best_pure][train]:.2f} for the "
                         f"best pure recurrence ({best_pure}): the hybrid "
                         + ("recovers attention-like recall." if at[h][train] > at[best_pure][train] + 0.1
                            else "does not beat the recurrences here."))
    lines.append("Published ordering (RULER, Zoology, Jamba): attention > hybrids > pure recurrences, sliding "
                 "window bounded by its window; the lines above say where this run agrees.")
    return "\n".join(lines)
