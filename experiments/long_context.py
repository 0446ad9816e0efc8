"""Long-context suite: every mixer kind and two hybrids on the whole task suite, accuracy vs length
(training length and 2x, 4x, 8x beyond), with state bytes and RULER's effective length.

Command:  cfm-jax sweep long_context --scale cpu && cfm-jax report long_context --scale cpu
Runtime:  smoke ~5 min (9 models x 4 tasks, 20 steps); cpu: 9 models x 2 tasks (passkey, single
          needle) x 3 seeds at 64 tokens, 600 steps each, about 20 min on 2 cores with one --shard per
          core; full: 9 models x 9 tasks at 512 tokens.
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


def reading(table):
    eff = {}
    for r in table:
        mixer, task = _split(r["cell"])
        if r.get("effective_length") is not None:
            eff.setdefault(mixer, []).append(r["effective_length"])
    if not eff:
        return "No finished cells."
    ranked = sorted(eff, key=lambda m: sum(eff[m]) / len(eff[m]), reverse=True)
    return ("Mean effective length over tasks (longest length with token accuracy >= 0.856), highest first: "
            + ", ".join(f"{m} {sum(eff[m]) / len(eff[m]):.0f}" for m in ranked) + ". "
            "Compare with the published ordering (attention > hybrids > pure recurrences, sliding window "
            "bounded by its window); at this scale many cells stay below the threshold at every length, "
            "which makes the effective length 0 and the comparison uninformative where that happens.")
