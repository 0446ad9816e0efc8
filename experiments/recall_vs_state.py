"""Recall vs state size (Based): MQAR accuracy against decoding-state bytes per sequence, sweeping the
knob that sets each mixer's state (window, key dim, d_state, heads).

Command:  cfm-jax sweep recall_vs_state --scale cpu && cfm-jax report recall_vs_state --scale cpu
Runtime:  smoke ~2 min; cpu: 6 families x 3 knob values x 3 seeds x 1000 steps on MQAR at 32 tokens,
          3 pairs and a 64-token vocabulary (a shape a d=64 attention model learns on a CPU budget; 4
          pairs does not, see mqar_capacity), ~42 min on 2 cores with one --shard per core (measured:
          83 core-minutes of training, 19 of them RWKV's; Mamba cells take 3-4 min each).
Expected: attention's state grows with length and it recalls best; at equal state, input-dependent
          recurrences (GLA, Mamba, RWKV) beat linear attention; sliding window is worst at equal state (Based).
"""

import re

from cfm_jax.harness.plots import grouped_lines, parse_cell

KNOBS = {  # family -> (knob override template, values)
    "attention": ("model.mixer.n_kv_heads={}", (1, 2, 4)),
    "sliding_window": ("model.mixer.window={}", (4, 8, 16)),
    "linear_attention": ("model.mixer.d_key={}", (4, 8, 16)),
    "gla": ("model.mixer.expand_k={}", (0.25, 0.5, 1.0)),
    "mamba": ("model.mixer.d_state={}", (4, 8, 16)),
    "rwkv": ("model.mixer.n_heads={}", (16, 8, 4)),  # head size d_model / n_heads: state d_model x head size
}
SIZES = {"smoke": dict(steps=30, values=1, L=128, kv=8, vocab=512), "cpu": dict(steps=1000, values=3, L=32, kv=3, vocab=64),
         "full": dict(steps=5000, values=3, L=512, kv=32, vocab=8192)}
SEEDS = 3


def cells(scale):
    s = SIZES[scale]
    out = {}
    for family, (template, values) in KNOBS.items():
        for v in values[: s["values"]]:
            out[f"{family}-k{v}"] = [
                "data.task=mqar", f"data.vocab_size={s['vocab']}", f"data.seq_len={s['L']}",
                f"data.num_kv_pairs={s['kv']}", f"data.eval_lengths={s['L']}", "model.d_model=64", "model.n_layers=2",
                f"model.mixer={family}", template.format(v), "train.batch_size=64", f"train.steps={s['steps']}", "train.lr=3e-3",
                "train.warmup_steps=50", "train.checkpoint_every=1000",
            ]
    return out


def COLUMNS(scale):
    L = SIZES[scale]["L"]
    return [f"len{L}/accuracy", f"state_bytes/{L}"]


def _length(table):
    """The evaluated length: the N of the table's lenN/accuracy columns."""
    for r in table:
        for k in r:
            if k.startswith("len") and k.endswith("/accuracy"):
                return int(k[3:].split("/")[0])
    return None


def plot(table, path):
    L = _length(table)
    grouped_lines(table, x=lambda r: r.get(f"state_bytes/{L}"), y=lambda r: r.get(f"len{L}/accuracy"),
                  ystd=lambda r: r.get(f"len{L}/accuracy_std"), group=lambda r: parse_cell(r["cell"])["kind"],
                  path=path, xlabel="decoding state per sequence (bytes, fp32)", ylabel="MQAR accuracy",
                  title=f"recall vs state (MQAR, L={L})", logx=True)


def _best_within(points, family, max_state):
    """Best accuracy of `family` among its points with state <= max_state (None if it has none)."""
    accs = [a for b, a, c in points if parse_cell(c)["kind"] == family and b <= max_state]
    return max(accs) if accs else None


def _compare(points, better, worse, chance):
    """'A beats B at equal state': the best accuracy of each with state up to the smallest budget at which
    both have a point (the larger of the two families' smallest states)."""
    cap = max(min(b for b, _, c in points if parse_cell(c)["kind"] == f) for f in (better, worse))
    a, b = _best_within(points, better, cap), _best_within(points, worse, cap)
    if a is None or b is None:
        return None
    if max(a, b) < chance + 0.05:
        verdict = "untested (both at chance)"
    else:
        verdict = "agrees" if a > b + 0.02 else ("disagrees" if a < b - 0.02 else "tie")
    return f"{better} {a:.2f} vs {worse} {b:.2f} with state <= {cap:.0f} bytes: {verdict}"


def reading(table, tests=()):
    L = _length(table)
    pts = [(r.get(f"state_bytes/{L}"), r.get(f"len{L}/accuracy"), r["cell"]) for r in table
           if r.get(f"len{L}/accuracy") is not None]
    if not pts:
        return "No finished cells."
    best = max(pts, key=lambda p: p[1])
    smallest_good = min((p for p in pts if p[1] >= 0.9 * best[1]), key=lambda p: p[0])
    pairs = [int(m.group(1)) for r in table if (m := re.search(r"num_kv_pairs=(\d+)", r.get("command", "")))]
    chance = 1 / pairs[0] if pairs else 0.0
    lines = [f"- {c}: accuracy {a:.2f} with {b:.0f} bytes of state" for b, a, c in sorted(pts, key=lambda p: p[0])]
    lines += ["", f"Chance (guessing among the sequence's {pairs[0] if pairs else '?'} values) is {chance:.2f}. "
              f"Best accuracy {best[1]:.2f} ({best[2]}, {best[0]:.0f} bytes of state); the smallest state within 90 % "
              f"of it is {smallest_good[0]:.0f} bytes ({smallest_good[2]}).", "",
              "The Based paper's claims, each tested at equal state (best accuracy of each family with at most "
              "the smallest state budget at which both have a point):"]
    families = {parse_cell(c)["kind"] for _, _, c in pts}
    claims = [("gla", "linear_attention"), ("mamba", "linear_attention"), ("rwkv", "linear_attention"),
              ("attention", "sliding_window"), ("gla", "sliding_window"), ("mamba", "sliding_window"),
              ("rwkv", "sliding_window")]
    for better, worse in claims:
        if better in families and worse in families:
            lines.append(f"- {_compare(pts, better, worse, chance)}")
    if "attention" in families:
        top = max((a for _, a, c in pts if parse_cell(c)["kind"] == "attention"))
        others = max((a for _, a, c in pts if parse_cell(c)["kind"] != "attention"), default=None)
        if others is not None:
            lines.append(f"- attention recalls best overall: {top:.2f} vs {others:.2f} for the best other family: "
                         + ("agrees" if top > others + 0.02 else "disagrees" if top < others - 0.02 else "tie"))
    return "\n".join(lines)
