"""Recall vs state size (Based): MQAR accuracy against decoding-state bytes per sequence, sweeping the
knob that sets each mixer's state (window, key dim, d_state, heads).

Command:  cfm-jax sweep recall_vs_state --scale cpu && cfm-jax report recall_vs_state --scale cpu
Runtime:  smoke ~2 min; cpu: 5 families x 3 knob values x 3 seeds x 600 steps, about 40 min on 2 cores.
Expected: attention's state grows with length and it recalls best; at equal state, input-dependent
          recurrences (GLA, Mamba) beat linear attention; sliding window is worst at equal state (Based).
"""

from cfm_jax.harness.plots import grouped_lines, parse_cell

KNOBS = {  # family -> (knob override template, values)
    "attention": ("model.mixer.n_kv_heads={}", (1, 2, 4)),
    "sliding_window": ("model.mixer.window={}", (8, 16, 32)),
    "linear_attention": ("model.mixer.d_key={}", (4, 8, 16)),
    "gla": ("model.mixer.expand_k={}", (0.25, 0.5, 1.0)),
    "mamba": ("model.mixer.d_state={}", (4, 8, 16)),
}
SIZES = {"smoke": dict(steps=30, values=1), "cpu": dict(steps=600, values=3), "full": dict(steps=5000, values=3)}
SEEDS = 3
L, KV = 128, 8


def cells(scale):
    s = SIZES[scale]
    out = {}
    for family, (template, values) in KNOBS.items():
        for v in values[: s["values"]]:
            out[f"{family}-k{v}"] = [
                "data.task=mqar", "data.vocab_size=512", f"data.seq_len={L}", f"data.num_kv_pairs={KV}",
                f"data.eval_lengths={L}", "model.d_model=64", "model.n_layers=2", f"model.mixer={family}",
                template.format(v), "train.batch_size=32", f"train.steps={s['steps']}", "train.lr=3e-3",
                "train.warmup_steps=50", "train.checkpoint_every=1000",
            ]
    return out


COLUMNS = [f"len{L}/accuracy", f"state_bytes/{L}"]


def plot(table, path):
    grouped_lines(table, x=lambda r: r.get(f"state_bytes/{L}"), y=lambda r: r.get(f"len{L}/accuracy"),
                  ystd=lambda r: r.get(f"len{L}/accuracy_std"), group=lambda r: parse_cell(r["cell"])["kind"],
                  path=path, xlabel="decoding state per sequence (bytes, fp32)", ylabel="MQAR accuracy",
                  title=f"recall vs state (L={L}, {KV} pairs)", logx=True)


def reading(table):
    pts = [(r.get(f"state_bytes/{L}"), r.get(f"len{L}/accuracy"), r["cell"]) for r in table
           if r.get(f"len{L}/accuracy") is not None]
    if not pts:
        return "No finished cells."
    best = max(pts, key=lambda p: p[1])
    smallest_good = min((p for p in pts if p[1] >= 0.9 * best[1]), key=lambda p: p[0])
    return (f"Best accuracy {best[1]:.2f} ({best[2]}, {best[0]} bytes of state); the smallest state within 90 % "
            f"of it is {smallest_good[0]} bytes ({smallest_good[2]}). The Based paper's frontier has "
            "attention on top and sliding window at the bottom at equal state; check the plot for where "
            "this run agrees.")
