"""Dynamic activation: active neurons per token vs token difficulty (per-token loss on held-out text),
and on easy vs hard MQAR, for the neuron-sparse FFN and MoEs of the same (ReLU) form and total
parameters (top-p, and top-k, constant by construction), all trained on text mixed with MQAR and copy
(`data.task=mix`), so the MQAR settings probe a skill the models have.

Command:  cfm-jax sweep dynamic_activation --scale cpu --workers 2 && cfm-jax report dynamic_activation --scale cpu
Runtime:  smoke ~2 min; cpu: 3 FFNs x 5 seeds x 1000 steps at d_model 64 (2 layers) plus the analysis,
          measured in the table's header; full (accelerator): d_model 512, 4 layers, 5000 steps,
          about 15 x 0.2 = 3 H100-hours at float32 (a rough estimate from sparsity_pareto's
          model size, not measured).
Expected: (CFM) hard tokens light up more neurons: a positive Spearman correlation between active
          count and loss for the neuron-sparse FFN, and more active neurons on hard MQAR (16 pairs)
          than on easy (2 pairs); top-k MoE is flat by construction; top-p MoE varies somewhat.
"""

from cfm_jax.harness.plots import grouped_lines
from cfm_jax.harness.bricks import mix_cells, skills_learned
from cfm_jax.harness.stats import Comparison

MOE = ["model.ffn=moe", "model.ffn.expert_activation=relu", "model.ffn.n_experts=8", "model.ffn.d_expert={e}"]
FFNS = {"neuron_sparse": ["model.ffn=neuron_sparse", "model.ffn.activation=relu", "model.ffn.d_ff={f}"],
        "moe_topp": [*MOE, "model.ffn.routing=topp", "model.ffn.top_p=0.5"],
        "moe_topk": [*MOE, "model.ffn.top_k=2"]}
SIZES = {"smoke": dict(steps=20, d=32, layers=2), "cpu": dict(steps=1000, d=64, layers=2),
         "full": dict(steps=5000, d=512, layers=4)}
SEEDS = 5
ANALYSES = ["dynamic"]
EASY, HARD = "dynamic/mqar_easy/mean_active_all_positions", "dynamic/mqar_hard/mean_active_all_positions"
COLUMNS = ["val/loss", "mqar/accuracy", "copy/accuracy", "stats/ffn/activation_ratio", "dynamic/mix/spearman", EASY, HARD]
COMPARISONS = [
    Comparison("neuron_sparse", "neuron_sparse", HARD, "greater",
               "hard MQAR (16 pairs) activates more neurons than easy MQAR (2 pairs) (CFM)", EASY),
    Comparison("moe_topp", "moe_topp", HARD, "greater", "top-p routing uses more experts on hard MQAR than on easy", EASY),
    Comparison("neuron_sparse", "moe_topp", "dynamic/mix/spearman", "greater",
               "neuron activity tracks token difficulty more than top-p routing does (CFM)"),
]


def cells(scale):
    s = SIZES[scale]
    return mix_cells(FFNS, s["d"], s["layers"], s["steps"])


def plot(table, path):
    rows = [{"ffn": r["cell"], "setting": s, "active": r.get(f"dynamic/mqar_{s}/mean_active_all_positions")}
            for r in table for s in ("easy", "hard")]
    grouped_lines(rows, x=lambda r: {"easy": 0, "hard": 1}[r["setting"]], y=lambda r: r["active"],
                  group=lambda r: r["ffn"], path=path, xlabel="MQAR setting (0 = easy, 1 = hard)",
                  ylabel="active neurons per layer (MoE: routed expert neurons)", title="dynamic activation")


def reading(table, tests=()):
    f = lambda v: "n/a" if v is None else f"{v:.3f}"
    out = []
    for r in table:
        rho, easy, hard = r.get("dynamic/mix/spearman"), r.get(EASY), r.get(HARD)
        if easy is None:
            out.append(f"- {r['cell']}: not run.")
            continue
        ci = r.get("dynamic/mix/spearman_ci")
        out.append(f"- {r['cell']}: Spearman(active units, token loss) on held-out text "
                   + ("n/a (constant count)" if rho is None else f"{rho:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""))
                   + f"; active neurons per layer on MQAR easy {easy:.1f} vs hard {hard:.1f}; trained MQAR accuracy "
                   f"{f(r.get('mqar/accuracy'))}, copy {f(r.get('copy/accuracy'))} (means over seeds, 95 % t interval).")
    found = [t for t in tests if t["verdict"] == "as expected"]
    out += ["", "Declared comparisons (Holm-adjusted over this table):", *[f"- {t['text']}" for t in tests], "",
            f"{len(found)} of {len(tests)} expected effects are found at n = {tests[0]['n'] if tests else 0} seeds. "
            "For MoE the count is routed experts x expert width: top-k is constant by construction (no correlation is "
            "defined). A Spearman interval that contains 0 does not show that activity tracks difficulty.", "",
            skills_learned(table)]
    return "\n".join(out)
