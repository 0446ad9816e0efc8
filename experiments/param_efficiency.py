"""Parameter efficiency on byte-level text: dense vs neuron-sparse vs MoE FFNs at three sizes, with
density (Densing Law) against the dense SwiGLU family.

Command:  cfm-jax sweep param_efficiency --scale cpu && cfm-jax report param_efficiency --scale cpu
Runtime:  smoke ~8 min (9 FFNs x 1 size + 3 reference widths, x 3 seeds, 20 steps); cpu: 9 FFNs x
          3 sizes (d_model 64, 96, 128; 2 layers) + dense SwiGLU at 3 more widths for the density fit,
          x 3 seeds at 300 steps of 2048 tokens, about 45 min on 2 cores with one --shard per core;
          full: d_model 256-768 (+ 128, 384, 1024 for the fit), 4 layers, 5000 steps.
Expected: (Sparsing Law, CFM) at matched total parameters the neuron-sparse FFNs reach the dense
          models' bits per byte at a much lower activation ratio; MoE at matched ACTIVE parameters beats
          dense of the same active size but is less parameter-efficient per total parameter.

Matched comparisons: all FFNs at one size share d_model and depth. `dense_*` and `ns_*` have about the
same TOTAL parameters (the gated forms are width-matched); the MoE rows have about the same ACTIVE
parameters as dense (expert width = dense width / (k + shared)) and more total parameters. The
`matched` column says which comparison a row belongs to.
"""

from cfm_jax.harness.density import density, fit_loss_curve
from cfm_jax.harness.plots import grouped_lines, parse_cell

FFNS = {
    "dense_swiglu": ["model.ffn=dense"],
    "dense_relu": ["model.ffn=dense", "model.ffn.activation=relu"],
    "ns_relu": ["model.ffn=neuron_sparse", "model.ffn.activation=relu"],
    "ns_relu2": ["model.ffn=neuron_sparse", "model.ffn.activation=relu2"],
    "ns_drelu": ["model.ffn=neuron_sparse", "model.ffn.activation=drelu"],
    "ns_relu_l1": ["model.ffn=neuron_sparse", "model.ffn.activation=relu", "model.ffn.l1_coef=0.1",
                   "model.ffn.l1_schedule=prosparse", "model.ffn.l1_stage_steps=50"],
    "moe_topk": ["model.ffn=moe", "model.ffn.top_k=2"],
    "moe_topp": ["model.ffn=moe", "model.ffn.routing=topp", "model.ffn.top_p=0.5"],
    "moe_fine_shared": ["model.ffn=moe", "model.ffn.n_experts=16", "model.ffn.top_k=4", "model.ffn.n_shared=1"],
}
SIZES = {"smoke": dict(widths=(64,), steps=20, layers=4), "cpu": dict(widths=(64, 96, 128), steps=300, layers=2),
         "full": dict(widths=(256, 512, 768), steps=5000, layers=4)}
# Extra dense SwiGLU widths for the density fit only (3 parameters need more than 3 points to be tested).
REFERENCE_WIDTHS = {"smoke": (32, 48, 96), "cpu": (48, 80, 160), "full": (128, 384, 1024)}
REFERENCE = "dense_swiglu"
SEEDS = 3
ANALYSES = ["cett"]
COLUMNS = ["val/bits_per_byte", "val/loss", "params_active_per_token", "flops_per_token", "stats/ffn/activation_ratio",
           "cett/sparsity_at_cett_ppl1", "inference_memory_4096_bytes"]


def cells(scale):
    s = SIZES[scale]
    models = [(name, d) for d in s["widths"] for name in FFNS] + [(REFERENCE, d) for d in REFERENCE_WIDTHS[scale]]
    return {
        f"{name}-d{d}": [*FFNS[name], "data.task=text", f"model.d_model={d}", f"model.n_layers={s['layers']}",
                         f"train.steps={s['steps']}", "train.batch_size=16", "data.seq_len=128",
                         "data.eval_batches=4", "train.checkpoint_every=1000"]
        for name, d in models
    }


def _with_density(table):
    dense = [r for r in table if parse_cell(r["cell"])["kind"] == REFERENCE and r.get("val/loss") is not None]
    fit = fit_loss_curve([r["params_non_embedding"] for r in dense], [r["val/loss"] for r in dense])
    for r in table:
        if r.get("val/loss") is None:
            continue
        r["density_total"] = density(fit, r["val/loss"], r["params_non_embedding"])
        r["density_active"] = density(fit, r["val/loss"], r["params_active_per_token"])
        r["matched"] = "active params" if parse_cell(r["cell"])["kind"].startswith("moe") else "total params"
    return fit


def plot(table, path):
    grouped_lines(table, x=lambda r: r.get("params_active_per_token"), y=lambda r: r.get("val/bits_per_byte"),
                  ystd=lambda r: r.get("val/bits_per_byte_std"), group=lambda r: parse_cell(r["cell"])["kind"],
                  path=path, xlabel="active parameters per token", ylabel="validation bits per byte",
                  title="parameter efficiency", logx=True)


def _by_size(table):
    """{d_model: {ffn kind: row}} over the rows that finished."""
    out = {}
    for r in table:
        if r.get("val/bits_per_byte") is not None:
            p = parse_cell(r["cell"])
            out.setdefault(int(p["d"]), {})[p["kind"]] = r
    return out


def _comparisons(sizes):
    """Plain-language lines: per size, neuron-sparse vs dense at equal total parameters and MoE vs
    dense at equal active parameters (bits per byte, lower is better)."""
    lines = []
    for d, rows in sorted(sizes.items()):
        ref = rows.get(REFERENCE)
        ns = {k: v for k, v in rows.items() if k.startswith("ns_")}
        moe = {k: v for k, v in rows.items() if k.startswith("moe_")}
        if ref is None or not (ns or moe):
            continue
        bpb = lambda r: r["val/bits_per_byte"]
        parts = []
        if ns:
            best = min(ns, key=lambda k: bpb(ns[k]))
            ratio = ns[best].get("stats/ffn/activation_ratio")
            parts.append(f"best neuron-sparse {best} {bpb(ns[best]):.3f} bits/byte at activation ratio "
                         f"{ratio:.2f} vs dense SwiGLU {bpb(ref):.3f} (equal total parameters, "
                         f"{bpb(ns[best]) - bpb(ref):+.3f})")
        if moe:
            best = min(moe, key=lambda k: bpb(moe[k]))
            parts.append(f"best MoE {best} {bpb(moe[best]):.3f} (equal active parameters, "
                         f"{bpb(moe[best]) - bpb(ref):+.3f} vs dense, with "
                         f"{moe[best]['params_non_embedding'] / ref['params_non_embedding']:.1f}x its non-embedding parameters)")
        lines.append(f"- d_model {d}: " + "; ".join(parts) + ".")
    return lines


def reading(table, tests=()):
    fit = _with_density(table)
    lines = []
    if fit.get("ok"):
        lines.append(f"Dense SwiGLU reference fit over {fit['points']} widths: L(N) = {fit['a']:.3g} N^-{fit['alpha']:.3f} "
                     f"+ {fit['l_inf']:.3f} (N = non-embedding parameters; relative RMS residual "
                     f"{fit['rel_rms_residual']:.2%}). Density = N_hat / N, where N_hat is the reference size "
                     "that reaches a row's loss; 1 = as efficient as the dense family.")
    else:
        lines.append(f"The dense reference fit FAILED ({fit.get('reason')}), so no density is reported.")
    lines.append("")
    lines.append("| cell | matched | bits/byte | activation ratio | density (N = non-embedding total) | density (N = active per token) |")
    lines.append("|---|---|---|---|---|---|")
    f = lambda v: "" if v is None else f"{v:.3g}"
    for r in table:
        if r.get("val/bits_per_byte") is None:
            continue
        lines.append(f"| {r['cell']} | {r['matched']} | {f(r['val/bits_per_byte'])} | {f(r.get('stats/ffn/activation_ratio'))} | "
                     f"{f(r['density_total'])} | {f(r['density_active'])} |")
    lines.append("")
    lines.append("`matched` names the comparison a row belongs to: ns_* and dense_relu against dense_swiglu at "
                 "equal total (and non-embedding) parameters; moe_* against dense_swiglu at equal active "
                 "parameters per token (more total parameters). Reference-only widths (dense_swiglu at widths "
                 "without the other FFNs) serve the density fit.")
    lines.append("")
    sizes = _by_size(table)
    lines += _comparisons(sizes)
    lines += ["", *_summary(table, sizes)]
    return "\n".join(lines)


def _summary(table, sizes):
    """Mean densities of the families, and whether ns_relu is the dense ReLU network (it should be)."""
    mean = lambda xs: sum(xs) / len(xs) if xs else None
    dens = lambda prefix, key: mean([r[key] for r in table if r.get(key) is not None and r["cell"].startswith(prefix)])
    out = []
    ns_act, moe_act = dens("ns_", "density_active"), dens("moe_", "density_active")
    ns_tot, moe_tot = dens("ns_", "density_total"), dens("moe_", "density_total")
    if None not in (ns_act, moe_act, ns_tot, moe_tot):
        out.append(f"Mean density over sizes, N = active parameters per token: neuron-sparse {ns_act:.2f}, MoE {moe_act:.2f}; "
                   f"N = non-embedding total: neuron-sparse {ns_tot:.2f}, MoE {moe_tot:.2f}. "
                   + ("Per active parameter the neuron-sparse FFNs are the more efficient family here, as the "
                      "Sparsing Law and CFM claim" if ns_act > moe_act else
                      "Per active parameter MoE is the more efficient family here, against the Sparsing Law's claim")
                   + "; per total parameter MoE pays for its unused experts (density well below 1).")
    same = [d for d, rows in sizes.items() if "ns_relu" in rows and "dense_relu" in rows
            and rows["ns_relu"]["val/loss"] == rows["dense_relu"]["val/loss"]]
    if same:
        out.append(f"ns_relu and dense_relu reach identical losses at d_model {', '.join(map(str, sorted(same)))}: "
                   "without L1 the neuron-sparse FFN is the dense ReLU network (it adds statistics and the "
                   "sparse decode path), so its difference from dense SwiGLU is ReLU's, and only the L1 / dReLU / "
                   "ReLU^2 rows test sparsity-specific changes.")
    gaps = [min(r["val/bits_per_byte"] for k, r in rows.items() if k.startswith("ns_")) - rows[REFERENCE]["val/bits_per_byte"]
            for d, rows in sorted(sizes.items()) if REFERENCE in rows and any(k.startswith("ns_") for k in rows)]
    if len(gaps) > 1:
        trend = ("shrinks" if all(abs(b) < abs(a) for a, b in zip(gaps, gaps[1:])) else "does not shrink monotonically")
        out.append(f"The best neuron-sparse row's gap to dense SwiGLU {trend} with width ("
                   + ", ".join(f"{g:+.3f}" for g in gaps) + " bits/byte from the smallest size up); these are "
                   "short runs of small models, and a longer budget may change the sign.")
    return out
