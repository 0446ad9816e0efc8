"""Long-context retrieval: which mixers retrieve by key, how far past the training length, and what
one attention layer adds to a recurrent stack (RULER-style tasks at small scale).

Tasks (cfm_jax/data/needle.py, tracking.py; token vocabulary 256 with disjoint key, value and filler
ranges, so a value token occurs only where it is stored):
  passkey            control: one number in repeated filler, no key to match
  niah_single        control: one needle [NEEDLE key v1 v2], queried by its key; the values occur
                     nowhere else, so it is solvable without matching the key
  niah_multiquery    4 needles with distinct keys, each queried: the answer depends on the key (RULER's
                     multi-key needle, queried 4 times per sequence: one query per sequence gave a d_model-64
                     attention model too little signal, 0.11 after 3,000 steps, measured)
  niah_multivalue    4 values stored under one key, all recalled in order
  variable_tracking  a chain X1 = v, X2 = X1, ... (4 hops) among noise: name every variable bound to v
Models, all 2 layers of d_model 64 (the project's block: mixer + SwiGLU FFN): attention and sliding
window (window 16, no sinks) with one head, Based (linear attention + short conv), GLA (short conv 4),
Mamba, RWKV-6, and two hybrids of the same depth: a GLA and a Mamba layer each followed by one
attention layer (`model.layers=gla,attention`); their parameter counts are in the table (params_total).
Trained at 64 tokens; accuracy per scored token at 64 / 128 / 256 / 512 (8x) and, for the needle
tasks, at the training length by needle depth 0 / 25 / 50 / 75 / 100 % (len64_depthD: depth 0 is the
start of the haystack, the farthest from the query), which shows a window's reach.

Command:  cfm-jax sweep long_context --scale cpu --workers 2 && cfm-jax report long_context --scale cpu
Runtime:  smoke ~13 min (8 models x 2 tasks x (2 lrs + 2 seeds), 20 steps); cpu: 8 x 5 x (2 tuning runs,
          lr 3e-4 and 1e-3 at seed 0, + 2 more seeds at the better one by accuracy at the training
          length, as mqar_capacity) x 3000 steps at batch 32, an estimated ~6.7 hours on 2 cores (the
          table's header states what was measured); full: d_model 256, 8 layers, 512 tokens (RULER's
          single-query multi-key task), 5000 steps, about 40 x 4 x 0.3 = 48 H100-hours at float32 (a
          rough estimate, not measured).
Sizing (seed 0, lr 1e-3, 2 layers, d_model 64, 64 tokens): attention with one head learns
          niah_multiquery by step 1750 (0.98) but single-query niah_multikey not in 3000 steps (0.11);
          Mamba stays at chance on niah_multiquery (0.01 at step 2000).
Expected: attention retrieves at the training length and degrades past it (RoPE extrapolation); the
          window fails needles beyond its reach (low at depth 0, high at depth 100); fixed-state mixers
          lose key-matched retrieval first (multi-query, variable tracking) while the controls stay easy;
          one attention layer restores much of a recurrent stack's recall (Jamba, Zoology's hybrids).
"""

from cfm_jax.data import get_task_class
from cfm_jax.harness import stats
from cfm_jax.harness.plots import grouped_lines
from cfm_jax.harness.stats import Comparison

MODELS = {  # name -> overrides (every model: SIZES' depth and width)
    "attention": ["model.mixer=attention", "model.mixer.n_heads=1"],
    "sliding_window": ["model.mixer=sliding_window", "model.mixer.n_heads=1", "model.mixer.window={window}",
                       "model.mixer.sinks=0"],
    "based": ["model.mixer=based_linear"],
    "gla": ["model.mixer=gla", "model.mixer.conv_size=4"],
    "mamba": ["model.mixer=mamba"],
    "rwkv": ["model.mixer=rwkv"],
    "hybrid_gla": ["model.mixer=attention", "model.mixer.n_heads=1", "model.layers=gla,attention",
                   "model.mixers.gla.conv_size=4"],
    "hybrid_mamba": ["model.mixer=attention", "model.mixer.n_heads=1", "model.layers=mamba,attention"],
}
TASKS = {
    "smoke": ("passkey", "niah_multiquery"),
    "cpu": ("passkey", "niah_single", "niah_multiquery", "niah_multivalue", "variable_tracking"),
    "full": ("passkey", "niah_single", "niah_multikey", "niah_multiquery", "niah_multivalue", "variable_tracking"),
}
SIZES = {"smoke": dict(d=32, layers=2, L=64, steps=20, window=16, batch=8),
         "cpu": dict(d=64, layers=2, L=64, steps=3000, window=16, batch=32),
         "full": dict(d=256, layers=8, L=512, steps=5000, window=64, batch=32)}
SEEDS = 3
SOLVED = 0.9
LR_GRID = [3e-4, 1e-3]  # mqar_capacity's: at d_model 64 GLA learned only at 3e-4, the rest best at 1e-3


def SELECT(scale):
    return (f"len{SIZES[scale]['L']}/accuracy", "max")  # at the training length, as Zoology picks
LENGTH_FACTORS = (1, 2, 4, 8)
DEPTHS = (0, 25, 50, 75, 100)
KEYED = ("niah_multiquery", "variable_tracking")  # tasks whose answer needs the key matched


def _needle(task: str) -> bool:
    return get_task_class(task).has_depth


def cells(scale):
    s = SIZES[scale]
    L = s["L"]
    out = {}
    for task in TASKS[scale]:
        depth = [f"data.eval_depths={len(DEPTHS)}"] if _needle(task) else []
        for name, overrides in MODELS.items():  # hybrids: the 2-layer pattern tiled to the same depth
            out[f"{name}-{task}"] = [
                f"data.task={task}", "data.vocab_size=256", f"data.seq_len={L}",
                "data.eval_lengths=" + ",".join(str(L * k) for k in LENGTH_FACTORS), *depth, "data.eval_batches=16",
                f"model.d_model={s['d']}", f"model.n_layers={s['layers']}", *(o.format(window=s["window"]) for o in overrides),
                f"train.batch_size={s['batch']}", f"train.steps={s['steps']}", "train.warmup_steps=50",
                f"train.eval_every={max(1, s['steps'] // 6)}", f"train.checkpoint_every={s['steps']}",
            ]
    return out


def COLUMNS(scale):
    L = SIZES[scale]["L"]
    return ([f"len{L * k}/accuracy" for k in LENGTH_FACTORS] + [f"len{L}_depth{d}/accuracy" for d in DEPTHS]
            + ["effective_length", "params_total", f"state_bytes/{L * LENGTH_FACTORS[-1]}"])


def COMPARISONS(scale):
    if scale == "smoke":
        return []
    L, far = SIZES[scale]["L"], SIZES[scale]["L"] * LENGTH_FACTORS[-1]
    train, depth0, depth100 = f"len{L}/accuracy", f"len{L}_depth0/accuracy", f"len{L}_depth100/accuracy"
    out = [Comparison("attention-passkey", "attention-passkey", train, "greater", column_b=f"len{far}/accuracy",
                      claim=f"attention degrades from {L} to {far} tokens (RoPE extrapolation)"),
           Comparison("sliding_window-niah_single", "sliding_window-niah_single", depth100, "greater", column_b=depth0,
                      claim="the window finds a needle near the query, not one at the start (its reach)"),
           Comparison("attention-niah_single", "sliding_window-niah_single", depth0, "greater",
                      claim="attention finds a needle at the start, the window does not")]
    for task in KEYED:
        out += [Comparison(f"hybrid_{m}-{task}", f"{m}-{task}", train, "greater",
                           claim=f"{task}: one attention layer adds key-matched recall to {m} (Jamba)") for m in ("gla", "mamba")]
        out += [Comparison(f"attention-{task}", f"{m}-{task}", train, "greater",
                           claim=f"{task}: attention retrieves by key better than {m}") for m in ("based", "gla", "mamba", "rwkv")]
    return out


def _split(cell):
    mixer, task = cell.split("-", 1)
    return mixer, task


def _by_length(row) -> dict[int, float]:
    return {int(k[3:].split("/")[0]): v for k, v in row.items()
            if k.startswith("len") and "_" not in k and k.endswith("/accuracy") and v is not None}


def _by_depth(row) -> dict[int, float]:
    return {int(k.split("_depth")[1].split("/")[0]): v for k, v in row.items()
            if "_depth" in k and k.endswith("/accuracy") and v is not None}


def plot(table, path):
    rows = [{"mixer": _split(r["cell"])[0], "task": _split(r["cell"])[1], "L": n, "acc": a}
            for r in table for n, a in _by_length(r).items()]
    grouped_lines(rows, x=lambda r: r["L"], y=lambda r: r["acc"], group=lambda r: r["mixer"],
                  panels=lambda r: r["task"], path=path, xlabel="context length", ylabel="accuracy",
                  title="", logx=True)


def chance(task: str, vocab_size: int = 256) -> float | None:
    """Token accuracy of a model that knows the answer's alphabet but not the answer: passkey digits
    are one of 10, needle values one of the vocabulary's value range; None where not worked out."""
    from cfm_jax.data.needle import N_DIGITS
    from cfm_jax.data.synthetic import token_ranges

    if task == "passkey":
        return 1 / N_DIGITS
    if task.startswith("niah"):
        lo, hi = token_ranges(vocab_size)["values"]
        return 1 / (hi - lo)
    return None


def reading(table, tests=()):
    runs = {_split(r["cell"]): r for r in table if _by_length(r)}
    if not runs:
        return "No finished cells."
    tasks = list(dict.fromkeys(t for _, t in runs))
    lengths = sorted({n for r in runs.values() for n in _by_length(r)})
    train, longest = lengths[0], lengths[-1]
    lines = [f"Accuracy per scored token, mean over seeds, at the training length {train} -> {longest} tokens "
             f"({longest // train}x); learned: >= 0.9 at the training length. Chance (answer alphabet known): "
             + ", ".join(f"{t} {c:.3f}" for t in tasks if (c := chance(t)) is not None) + ".", ""]
    for t in tasks:
        mine = sorted(((m, r) for (m, tt), r in runs.items() if tt == t), key=lambda mr: -_by_length(mr[1])[train])
        fmt = lambda m, r: f"{m} {_by_length(r)[train]:.2f} -> {_by_length(r).get(longest, float('nan')):.2f}"
        learned = [fmt(m, r) for m, r in mine if _by_length(r)[train] >= 0.9]
        rest = [fmt(m, r) for m, r in mine if _by_length(r)[train] < 0.9]
        lines.append(f"- {t}: learned by {', '.join(learned) or 'none'}; not by {', '.join(rest) or 'none'}.")
        depth = {m: _by_depth(r) for m, r in mine if _by_depth(r)}
        if "sliding_window" in depth:
            lines.append("  By needle depth (0 = farthest from the query), sliding window: "
                         + " / ".join(f"{d}% {a:.2f}" for d, a in sorted(depth["sliding_window"].items()))
                         + ("; attention: " + " / ".join(f"{a:.2f}" for _, a in sorted(depth["attention"].items()))
                            if "attention" in depth else "") + ".")
    params = {m: r.get("params_total") for (m, _), r in runs.items() if r.get("params_total")}
    if params:
        lines += ["", "Parameters (every model has the same depth): " + ", ".join(f"{m} {p / 1e3:.0f}K" for m, p in sorted(params.items()))
                  + ". Each hybrid is compared with the pure models of its depth."]
    lines += ["", "Declared comparisons (Holm-adjusted; a claim counts as found only where its test passed):"]
    lines += [f"- {t['claim']}: {stats.short_wording(t)}." for t in tests]
    if tests:
        lines += ["", "Published findings, as tested here:", *_findings(tests, runs, train)]
    return "\n".join(lines)


def _tally(tests, phrase: str) -> str:
    """'found in k of n (who); not shown in ...; j not tested yet' over the claims containing `phrase`."""
    mine = [t for t in tests if phrase in t["claim"]]
    if not mine:
        return "not declared"
    who = lambda t: t["claim"].split(":")[0] + " " + (t["b"] if "better than" in t["claim"] else t["a"]).split("-")[0]
    found = [who(t) for t in mine if t.get("verdict") == "as expected"]
    opposite = [who(t) for t in mine if t.get("verdict") == "opposite"]
    pending = sum(stats.untested(t) for t in mine)
    return (f"found in {len(found)} of {len(mine)}" + (f" ({', '.join(found)})" if found else "")
            + (f"; the opposite in {', '.join(opposite)}" if opposite else "")
            + (f"; {pending} not tested yet" if pending else ""))


def _findings(tests, runs, train: int) -> list[str]:
    """One line per published finding the comparisons test, and the fixed-state mixers that learned a
    keyed task anyway (where the fixed state sufficed at this length)."""
    one = lambda phrase: next((stats.short_wording(t) for t in tests if phrase in t["claim"]), "not declared")
    fixed = ("based", "gla", "mamba", "rwkv")
    sufficed = [f"{m} on {t} ({_by_length(r)[train]:.2f})" for (m, t), r in runs.items()
                if m in fixed and t in KEYED and _by_length(r)[train] >= 0.9]
    return [f"- attention's accuracy falls past its training length (RoPE extrapolation, as RULER reports): "
            f"{one('attention degrades')}.",
            f"- a sliding window recalls only within its reach: near vs far needle {one('its reach')}; attention vs "
            f"the window on the farthest needle {one('the window does not')}.",
            f"- attention retrieves by key better than a fixed-state mixer (Zoology): {_tally(tests, 'retrieves by key')}.",
            f"- one attention layer adds key-matched recall to a recurrent stack (Jamba; Zoology's hybrids): "
            f"{_tally(tests, 'adds key-matched recall')}.",
            "- fixed-state mixers that learned a key-matched task anyway (>= 0.9 at the training length, where "
            f"their state sufficed): {', '.join(sufficed) or 'none'}."]
