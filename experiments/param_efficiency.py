"""Parameter efficiency on byte-level text, like with like, across sizes and token budgets: dense
SwiGLU, the neuron-sparse FFN in two forms (ReLU, ReGLU), and MoEs of the same two expert forms, each
at equal TOTAL parameters (8 experts of width F/8, top-2) and at equal ACTIVE parameters (8 wider
experts, top-2, sized to the neuron-sparse FFN's measured active weights), with density (Densing Law)
against the dense SwiGLU family at each budget and a bootstrap interval over seeds.

Cells `FAMILY-dD-sSTEPS` (2 layers; F = the dense default width of the form: ReLU 4d, gated 8d/3):
  dense_swiglu                  the reference (also at extra widths, for the density fit only)
  ns_relu, ns_reglu             neuron_sparse of width F (no penalty: the activation's own sparsity)
  moe_relu, moe_reglu           8 experts of width F/8, top-2: equal total parameters to ns_*
  moe_relu_wide, moe_reglu_wide 8 experts, top-2, each wide enough that the active weights equal the
                                neuron-sparse FFN's (at NS_ACTIVE_RATIO): equal active parameters

Command:  cfm-jax sweep param_efficiency --scale cpu --workers 2 && cfm-jax report param_efficiency --scale cpu
Runtime:  smoke ~4 min; cpu: (7 FFNs x 3 sizes + 3 reference widths) x 2 budgets (400 and 1600 steps
          of 2048 tokens) x 3 seeds = 144 runs, about 5.5 core-hours (2.8 h with two workers, estimated
          from 0.09-0.2 s per step); continuable through the committed run records; full (accelerator):
          d_model 256-768, 4 layers, 5000 / 20000 steps, roughly 40 H100-hours at float32 (not measured).
Expected: (Sparsing Law, CFM) at equal total parameters the neuron-sparse FFN beats the MoE of its own
          form; at equal active parameters it is no worse; per active parameter its density is higher.
          The ordering should hold from the smaller budget to the 4x larger one.
"""

from cfm_jax.harness.density import bootstrap_densities, fit_loss_curve
from cfm_jax.harness.plots import grouped_lines, parse_cell
from cfm_jax.harness.stats import Comparison

E, K = 8, 2
NS_ACTIVE_RATIO = 0.3  # measured ns activation ratio at d 64 (sparsity_pareto); sizes the *_wide experts
SIZES = {"smoke": dict(widths=(32,), budgets=(10, 40), layers=2),
         "cpu": dict(widths=(64, 96, 128), budgets=(400, 1600), layers=2),
         "full": dict(widths=(256, 512, 768), budgets=(5000, 20000), layers=4)}
# Extra dense SwiGLU widths for the density fit only (3 parameters need more than 3 points to be tested).
REFERENCE_WIDTHS = {"smoke": (24, 48, 64), "cpu": (48, 80, 160), "full": (128, 384, 1024)}
REFERENCE = "dense_swiglu"
SEEDS = 3
COLUMNS = ["val/bits_per_byte", "val/loss", "ffn_params_active_per_token", "ffn_flops_per_token",
           "mixer_flops_per_token", "stats/ffn/activation_ratio", "params_active_per_token"]
PAIRS = [("ns_relu", "moe_relu", "equal total parameters"), ("ns_relu", "moe_relu_wide", "equal active parameters"),
         ("ns_reglu", "moe_reglu", "equal total parameters"), ("ns_reglu", "moe_reglu_wide", "equal active parameters")]


def widths(d: int) -> dict[str, int]:
    """FFN widths at d_model d: F of each form and the expert widths of each MoE family (see module doc;
    *_wide: relu d F (1 + r) = K * 2 d w, reglu d F (1 + 2 r) = K * 3 d w)."""
    relu, gated = 4 * d, -(-(8 * d // 3) // 8) * 8
    r = NS_ACTIVE_RATIO
    return {"relu": relu, "reglu": gated, "moe_relu": relu // E, "moe_reglu": max(1, round(gated / E)),
            "moe_relu_wide": round(relu * (1 + r) / (2 * K)), "moe_reglu_wide": round(gated * (1 + 2 * r) / (3 * K))}


def ffn(family: str, d: int) -> list[str]:
    w = widths(d)
    if family == REFERENCE:
        return ["model.ffn=dense"]
    if family.startswith("ns_"):
        form = family[3:]
        return ["model.ffn=neuron_sparse", f"model.ffn.activation={form}", f"model.ffn.d_ff={w[form]}"]
    form = "reglu" if "reglu" in family else "relu"
    return ["model.ffn=moe", f"model.ffn.expert_activation={form}", f"model.ffn.n_experts={E}",
            f"model.ffn.top_k={K}", f"model.ffn.d_expert={w[family]}"]


FAMILIES = [REFERENCE, "ns_relu", "moe_relu", "moe_relu_wide", "ns_reglu", "moe_reglu", "moe_reglu_wide"]


def cells(scale):
    s = SIZES[scale]
    models = [(f, d) for d in s["widths"] for f in FAMILIES] + [(REFERENCE, d) for d in REFERENCE_WIDTHS[scale]]
    return {
        f"{family}-d{d}-s{steps}": [*ffn(family, d), "data.task=text", f"model.d_model={d}", f"model.n_layers={s['layers']}",
                                    f"train.steps={steps}", "train.batch_size=16", "data.seq_len=128", "data.eval_batches=4",
                                    f"train.checkpoint_every={steps}", f"train.eval_every={max(1, steps // 8)}"]
        for steps in s["budgets"] for family, d in models
    }


def COMPARISONS(scale):
    s = SIZES[scale]
    return [Comparison(f"{a}-d{d}-s{steps}", f"{b}-d{d}-s{steps}", "val/loss", "less",
                       f"at {how}, {a} beats {b} (Sparsing Law / CFM)")
            for steps in s["budgets"] for d in s["widths"] for a, b, how in PAIRS]


def plot(table, path):
    grouped_lines(table, x=lambda r: r.get("ffn_params_active_per_token"), y=lambda r: r.get("val/bits_per_byte"),
                  ystd=lambda r: r.get("val/bits_per_byte_std"), group=lambda r: parse_cell(r["cell"])["kind"],
                  panels=lambda r: f"{parse_cell(r['cell'])['s']} steps", path=path,
                  xlabel="FFN active parameters per token (measured)", ylabel="validation bits per byte",
                  title="parameter efficiency", logx=True)


def densities(table) -> dict:
    """{budget: {"fit": dense fit, "seeds": S, "total": {cell: bootstrap entry, N = non-embedding
    parameters}, "active": {cell: ..., N = active parameters per token}}} for budgets with >= 3
    reference widths; rows with fewer finished seeds than the others are left out, so that seeds pair."""
    out = {}
    for steps in sorted({int(parse_cell(r["cell"])["s"]) for r in table}):
        rows = [r for r in table if int(parse_cell(r["cell"])["s"]) == steps and r.get("val/loss_values")]
        # Seeds pair by position only where every row has them all: rows missing a seed are left out
        # of the density (the table still shows their losses).
        seeds = max((len(r["val/loss_values"]) for r in rows), default=0)
        rows = [r for r in rows if len(r["val/loss_values"]) == seeds]
        ref = [r for r in rows if parse_cell(r["cell"])["kind"] == REFERENCE]
        if len(ref) < 3 or seeds == 0:
            continue
        ref_sizes = [r["params_non_embedding"] for r in ref]
        ref_losses = [r["val/loss_values"][:seeds] for r in ref]
        total = {r["cell"]: (r["val/loss_values"][:seeds], r["params_non_embedding"]) for r in rows}
        active = {r["cell"]: (r["val/loss_values"][:seeds], r["params_active_per_token"])
                  for r in rows if r.get("params_active_per_token") is not None}
        out[steps] = {"fit": fit_loss_curve(ref_sizes, [sum(v) / len(v) for v in ref_losses]), "seeds": seeds,
                      "total": bootstrap_densities(ref_sizes, ref_losses, total, reps=500),
                      "active": bootstrap_densities(ref_sizes, ref_losses, active, reps=500)}
    return out


def reading(table, tests=()):
    f = lambda v, fmt=".3f": "n/a" if v is None else format(v, fmt)
    ci = lambda e: "" if not e or e.get("ci") is None else f" [{e['ci'][0]:.2f}, {e['ci'][1]:.2f}]"
    dens = densities(table)
    lines = []
    for steps in sorted(dens):
        fit = dens[steps]["fit"]
        lines.append(f"Budget {steps} steps: dense SwiGLU reference fit over {fit.get('points', 0)} widths: "
                     + (f"L(N) = {fit['a']:.3g} N^-{fit['alpha']:.3f} + {fit['l_inf']:.3f} (relative RMS residual "
                        f"{fit['rel_rms_residual']:.2%})." if fit.get("ok") else f"FAILED ({fit.get('reason')}): no density."))
    lines += ["", "| cell | bits/byte | FFN active params/token | FFN FLOPs/token | activation ratio | density (N = non-embedding) [95 % bootstrap] | density (N = active) [95 % bootstrap] |",
              "|---|---|---|---|---|---|---|"]
    for r in table:
        steps = int(parse_cell(r["cell"])["s"])
        d = dens.get(steps, {})
        tot, act = d.get("total", {}).get(r["cell"]), d.get("active", {}).get(r["cell"])
        lines.append(f"| {r['cell']} | {f(r.get('val/bits_per_byte'))} | {f(r.get('ffn_params_active_per_token'), '.0f')} | "
                     f"{f(r.get('ffn_flops_per_token'), '.0f')} | {f(r.get('stats/ffn/activation_ratio'))} | "
                     f"{f(tot and tot['density'], '.2f')}{ci(tot)} | {f(act and act['density'], '.2f')}{ci(act)} |")
    floor = {s: [e["density"] for c, e in d["total"].items() if c.startswith(REFERENCE) and e["density"] is not None]
             for s, d in dens.items()}
    for s, vals in sorted(floor.items()):
        if vals:
            lines.append(f"\nNoise floor at {s} steps: the dense reference rows' own densities span "
                         f"{min(vals):.2f}-{max(vals):.2f} (1 = on the fitted curve); a density inside that span is "
                         "not distinguishable from the dense family.")
    found = [t for t in tests if t["verdict"] == "as expected"]
    opposite = [t for t in tests if t["verdict"] == "opposite"]
    lines += ["", "Declared comparisons (paired by seed, Holm-adjusted over this table):", *[f"- {t['text']}" for t in tests], "",
              f"{len(found)} of {len(tests)} expected differences are found and {len(opposite)} go the opposite way "
              f"at n = {tests[0]['n'] if tests else 0} seeds. Where a comparison is not distinguishable or opposite, "
              "neuron-sparse does not beat that MoE at that size and budget."]
    return "\n".join(lines)
