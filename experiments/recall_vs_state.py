"""Recall vs state size (the Based paper's frontier): MQAR accuracy against decoding-state bytes per
sequence, sweeping the knob that sets each mixer's state at one width.

Every cell is mqar_capacity's narrowest cell of its mixer (same data, model, budget, lr grid and seeds:
vocabulary 4,096, a mixture of 4-16 key-value pairs at 64 tokens, scored per pair count) with one
state knob changed; the frontier is read at the most pairs (the demanding setting) and the table shows
every count. Knobs (three values each, the middle or last one mqar_capacity's default):
  attention        4 / 2 / 1 query heads sharing one KV head (head size 16 / 32 / 64: KV cache 8 / 16 / 32 KB
                   per layer at 64 tokens)
  sliding_window   window 8 / 16 / 32 tokens (no sink tokens)
  based            key dim before the Taylor map 4 / 8 / 16 (feature dim 21 / 73 / 273)
  mamba            d_state 4 / 8 / 16
  gla              key width expand_k 0.25 / 0.5 / 1
  rwkv             heads 16 / 8 / 4 (head size 4 / 8 / 16: state d_model x head size)

Command:  cfm-jax sweep recall_vs_state --scale cpu --workers 2 && cfm-jax report recall_vs_state --scale cpu
Runtime:  smoke ~6 min; cpu: 12 new cells x (2 tuning runs + 4 more seeds, 9 for RWKV's two and the
          8-token window: SEEDS) x 4000 steps at d_model 64 (the 6 default-knob cells are
          mqar_capacity's runs, shared), 5-17 minutes per run with two sharing the cores
          (mqar_capacity's d_model-64 runs, measured 2026-12-07: attention 4.7, Based 5.5, Mamba 8,
          GLA 7-9, RWKV 17, sliding window ~6): an estimated ~6.7 hours on 2 cores
          (the table's header states what was measured); full: mqar_capacity's full shapes, about 18
          x 6 x 0.3 = 32 H100-hours at float32 (a rough estimate, not measured).
Expected (Based, Arora et al. 2024, fig. 2): accuracy rises with state for every mixer; at equal
          state the sliding window is worst, and Based's linear attention sits on or near the frontier
          (above Mamba at equal state); attention recalls best but with the largest state.
"""

from cfm_jax.harness.experiments import load_experiment
from cfm_jax.harness import stats
from cfm_jax.harness.plots import grouped_lines, parse_cell
from cfm_jax.harness.stats import Comparison

KNOBS = {  # mixer -> (knob override template, values); cells are MIXER-vV (gla: v x 100)
    # attention: 1 / 2 / 4 query heads sharing one KV head (head size 64 / 32 / 16): the KV cache shrinks
    "attention": ("model.mixer.n_heads={}", (4, 2, 1)),
    "sliding_window": ("model.mixer.window={}", (8, 16, 32)),
    "based": ("model.mixer.d_key={}", (4, 8, 16)),
    "mamba": ("model.mixer.d_state={}", (4, 8, 16)),
    "gla": ("model.mixer.expand_k={}", (0.25, 0.5, 1.0)),
    "rwkv": ("model.mixer.n_heads={}", (16, 8, 4)),
}


def SEEDS(scale, cell):
    """5 seeds (its default-knob cells share seeds 0-4 of mqar_capacity's d_model-64 runs), 10 for
    RWKV's cells and the window cell RWKV is compared with at equal state: RWKV's seeds split (at 16
    pairs mqar_capacity's seeds 0-4 read 0.89 / 0.67 / 0.96 / 0.45 / 0.04, one solved, one on the
    plateau), which makes its comparisons sign-flip tests, and those cannot go below p = 0.0625 at
    n = 5 (0.002 at n = 10)."""
    return 10 if scale != "smoke" and (cell.startswith("rwkv-") or cell == "sliding_window-v8") else 5

SOLVED = 0.9
LEARNED = 0.05  # mqar_capacity's: mean accuracy under which a cell did not learn the task
LR_GRID = [3e-4, 1e-3]  # mqar_capacity's (its cells are shared: test_experiments checks they agree)
# Claims at about equal state (4-6 KB per layer: window 8, Based key dim 4, Mamba d_state 4, GLA
# expand_k 1, RWKV 4 heads) and attention vs the window at 8 KB each (4 heads of size 16 sharing one KV
# head; window 16); every family's largest knob vs its smallest.
EQUAL_STATE = [("based-v4", "sliding_window-v8"), ("mamba-v4", "sliding_window-v8"), ("gla-v100", "sliding_window-v8"),
               ("rwkv-v4", "sliding_window-v8"), ("attention-v4", "sliding_window-v16"), ("based-v4", "mamba-v4")]


def _name(mixer: str, value: float) -> str:
    return f"{mixer}-v{round(value * 100) if mixer == 'gla' else value:g}"


def _capacity():
    return load_experiment("mqar_capacity")


def SELECT(scale):
    return _capacity().select_for(scale)


def _base(scale):
    """mqar_capacity's narrowest cell per mixer: mixer -> overrides."""
    cap = _capacity().base_cells(scale)
    width = lambda o: int(next(x.split("=")[1] for x in o if x.startswith("model.d_model=")))
    return {m: min((o for c, o in cap.items() if c.startswith(f"{m}-d")), key=width) for m in KNOBS}


def _setting(scale) -> tuple[int, list[int]]:
    """(sequence length, pair counts) of the cells."""
    o = next(iter(_base(scale).values()))
    get = lambda key: next(x.split("=")[1] for x in o if x.startswith(key + "="))
    return int(get("data.seq_len")), [int(k) for k in get("data.eval_kv_pairs").split(",")]


def _knob(mixer: str, value: float) -> list[str]:
    template = KNOBS[mixer][0]
    multi_query = ["model.mixer.n_kv_heads=1"] if mixer == "attention" and value > 1 else []
    return [template.format(f"{value:g}"), *multi_query]


def cells(scale):
    base, out = _base(scale), {}
    for m, (_, values) in KNOBS.items():
        for v in values[:1] if scale == "smoke" else values:
            knob = _knob(m, v)
            keys = {o.split("=")[0] for o in knob}  # the knob replaces the base's setting of its keys
            out[_name(m, v)] = [o for o in base[m] if o.split("=")[0] not in keys] + knob
    return out


def COLUMNS(scale):
    L, pairs = _setting(scale)
    return [f"len{L}kv{kv}/accuracy" for kv in pairs] + ["mean_accuracy", f"state_bytes/{L}"]


def COMPARISONS(scale):
    if scale == "smoke":
        return []
    L, pairs = _setting(scale)
    col = f"len{L}kv{pairs[-1]}/accuracy"
    out = [Comparison(a, b, col, "greater", claim=f"{a} above {b} at about equal state (Based)") for a, b in EQUAL_STATE]
    out += [Comparison(_name(m, values[-1]), _name(m, values[0]), col, "greater", claim=f"{m}: more state, better recall")
            for m, (_, values) in KNOBS.items()]
    return out


def _state_key(table):
    return next((k for r in table for k in r if k.startswith("state_bytes/") and not k.endswith(("_std", "_ci"))), None)


def _most_key(table):
    keys = [k for r in table for k in r if k.startswith("len") and k.endswith("/accuracy") and "kv" in k]
    return max(keys, key=lambda k: int(k.split("kv")[1].split("/")[0])) if keys else None


def plot(table, path):
    s, a = _state_key(table), _most_key(table)
    grouped_lines(table, x=lambda r: r.get(s), y=lambda r: r.get(a), ystd=lambda r: r.get(f"{a}_std"),
                  group=lambda r: parse_cell(r["cell"])["kind"], path=path, logx=True,
                  xlabel="decoding state per sequence (bytes, fp32)", ylabel=f"MQAR accuracy ({a.split('/')[0]})",
                  title="recall vs state (Based frontier)")


def reading(table, tests=()):
    s, a = _state_key(table), _most_key(table)
    pts = sorted((r[s], r[a], r["cell"]) for r in table if a and r.get(a) is not None and r.get(s) is not None)
    if not pts:
        return "No finished cells."
    lines = [f"Accuracy at the most pairs ({a.split('/')[0]}), mean over seeds, by decoding state (fp32 bytes per "
             "sequence, all layers):", ""]
    lines += [f"- {c}: {acc:.2f} with {b / 1024:.1f} KB" for b, acc, c in pts]
    rows = {r["cell"]: r for r in table}
    lines += ["", "Declared comparisons (Holm-adjusted over the table; a claim counts as found only where its test passed):"]
    lines += [f"- {t['claim']}: {stats.short_wording(t)}" + (
        f"; both sides are below {LEARNED}, so it says nothing about the frontier" if stats.both_below(t, rows, LEARNED) else "")
        + "." for t in tests]
    if tests:
        counted = lambda phrase: [t for t in tests if phrase in t["claim"] and not stats.both_below(t, rows, LEARNED)]
        found = lambda ts: [t["a"].split("-")[0] if "more state" in t["claim"] else f"{t['a']} over {t['b']}"
                             for t in ts if t.get("verdict") == "as expected"]
        rise, above = counted("more state"), counted("about equal state")
        lines += ["", "The Based paper's findings, as tested here (a comparison between two cells below "
                  f"{LEARNED} is not counted): recall rises with state in {len(found(rise))} of {len(KNOBS)} families ("
                  + (", ".join(found(rise)) or "none") + f"); at about equal state, a cell above the other in "
                  f"{len(found(above))} of {len(EQUAL_STATE)} pairs (" + (", ".join(found(above)) or "none") + ")."]
    return "\n".join(lines)
