"""Quickstart: tiny attention transformers on byte-level text and on MQAR, dense SwiGLU vs ReLU FFN.

Command:  cfm-jax sweep quickstart --scale smoke && cfm-jax report quickstart --scale smoke
          (`make demo` runs exactly this)
Runtime:  about a minute at smoke scale on 2 CPU cores (4 cells x 200 steps); 30-40 minutes at cpu (4 x 400).
Expected: text cells reach a few bits per byte (smoke: ~3.3-3.6; cpu: < 2.5); MQAR accuracy stays
          near chance at smoke scale (too few steps) and should approach 1 at cpu scale for attention.
"""

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
