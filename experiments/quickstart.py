"""Quickstart: tiny attention transformers on byte-level text and on MQAR, dense SwiGLU vs ReLU FFN.

Command:  cfm-jax sweep quickstart --scale smoke && cfm-jax report quickstart --scale smoke
          (`make demo` runs exactly this)
Runtime:  about a minute at smoke scale on 2 CPU cores (4 cells x 200 steps); 30-40 minutes at cpu (4 x 400).
Expected: text cells reach ~3.7 bits per byte at smoke scale and ~2.2 at cpu scale (ReLU and SwiGLU
          within a few hundredths); MQAR accuracy stays near chance at smoke scale and at ~0.2
          after 400 cpu-scale steps (below the 0.25 of guessing among the sequence's 4 values): MQAR needs far longer training to reach the
          near-perfect recall Zoology reports for attention (see experiments/mqar_capacity.py).
"""

# Both scales' evaluation lengths (smoke: 128, 256, 512; cpu: 256, 512, 1024); missing ones stay blank.
COLUMNS = ["val/bits_per_byte", "val/accuracy", "len128/accuracy", "len256/accuracy", "len512/accuracy",
           "len1024/accuracy"]

MQAR = ["data.task=mqar", "data.vocab_size=256", "data.num_kv_pairs=4"]


def cells(scale: str) -> dict[str, list[str]]:
    # smoke: 200 steps per cell so the demo shows learning and still takes about a minute.
    steps = {"smoke": ["train.steps=200", "train.checkpoint_every=100"], "cpu": ["train.steps=400"], "full": []}[scale]
    return {
        "text-swiglu": ["data.task=text", *steps],
        "text-relu": ["data.task=text", "model.ffn.activation=relu", *steps],
        "mqar-swiglu": [*MQAR, *steps],
        "mqar-relu": [*MQAR, "model.ffn.activation=relu", *steps],
    }


def reading(table, tests=()):
    rows = {r["cell"]: r for r in table}
    text = [rows[c] for c in ("text-swiglu", "text-relu") if rows.get(c, {}).get("val/bits_per_byte") is not None]
    out = []
    if len(text) == 2:
        diff = text[1]["val/bits_per_byte"] - text[0]["val/bits_per_byte"]
        out.append(f"On text the ReLU FFN ends {abs(diff):.3f} bits per byte {'worse' if diff > 0 else 'better'} than "
                   f"SwiGLU ({text[1]['val/bits_per_byte']:.3f} vs {text[0]['val/bits_per_byte']:.3f}) with "
                   f"{int(text[1]['params_total'] - text[0]['params_total']):+d} parameters. One seed only: the seed-to-seed spread is not measured here, so this difference "
                   "is not established.")
    for cell in ("mqar-swiglu", "mqar-relu"):
        accs = {k: v for k, v in rows.get(cell, {}).items() if k.startswith("len") and k.endswith("/accuracy") and v is not None}
        if accs:
            out.append(f"{cell}: MQAR accuracy " + ", ".join(f"{v:.2f} at {k[3:-9]}" for k, v in sorted(accs.items(), key=lambda kv: int(kv[0][3:-9])))
                       + " tokens. A uniform guess over the 128 value tokens scores 1/128 = 0.008; guessing one of "
                       "the sequence's 4 values scores 0.25. Near or below 0.25 the model has learned which tokens "
                       "are values but not which key they belong to: the key-value binding needs far longer "
                       "training (see experiments/mqar_capacity.py).")
    return "\n\n".join(out)
