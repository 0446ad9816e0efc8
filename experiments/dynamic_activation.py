"""Dynamic activation: active neurons per token vs token difficulty (per-token loss), and on easy vs
hard MQAR, for the neuron-sparse FFN, top-p MoE and top-k MoE (constant by construction).

Command:  cfm-jax sweep dynamic_activation --scale cpu && cfm-jax report dynamic_activation --scale cpu
Runtime:  smoke ~2 min; cpu: 3 FFNs x 3 seeds x 400 steps at d_model 64 (2 layers) plus the analysis,
          about 5 min on 2 cores with one --shard per core.
Expected: (CFM) hard tokens light up more neurons: a positive Spearman correlation between active
          count and loss for the neuron-sparse FFN, and more active neurons on hard MQAR than on easy;
          top-k MoE is flat by construction; top-p MoE varies somewhat.
"""

from cfm_jax.harness.plots import grouped_lines

FFNS = {"neuron_sparse": ["model.ffn=neuron_sparse", "model.ffn.activation=relu"],
        "moe_topp": ["model.ffn=moe", "model.ffn.routing=topp", "model.ffn.top_p=0.5"],
        "moe_topk": ["model.ffn=moe", "model.ffn.top_k=2"]}
SIZES = {"smoke": dict(steps=20, d=128, layers=4), "cpu": dict(steps=400, d=64, layers=2),
         "full": dict(steps=5000, d=512, layers=4)}
SEEDS = 3
ANALYSES = ["dynamic"]
COLUMNS = ["val/loss", "stats/ffn/activation_ratio", "dynamic/text/spearman",
           "dynamic/mqar_easy/mean_active_all_positions", "dynamic/mqar_hard/mean_active_all_positions"]


def cells(scale):
    return {name: [*o, "data.task=text", f"model.d_model={SIZES[scale]['d']}",
                   f"model.n_layers={SIZES[scale]['layers']}", f"train.steps={SIZES[scale]['steps']}",
                   "train.batch_size=16", "data.seq_len=128", "data.eval_batches=4", "train.checkpoint_every=1000"]
            for name, o in FFNS.items()}


def plot(table, path):
    rows = [{"ffn": r["cell"], "setting": s, "active": r.get(f"dynamic/mqar_{s}/mean_active_all_positions")}
            for r in table for s in ("easy", "hard")]
    grouped_lines(rows, x=lambda r: {"easy": 0, "hard": 1}[r["setting"]], y=lambda r: r["active"],
                  group=lambda r: r["ffn"], path=path, xlabel="MQAR setting (0 = easy, 1 = hard)",
                  ylabel="active neurons per layer (MoE: computed expert neurons)", title="dynamic activation")


def reading(table):
    out = []
    for r in table:
        rho = r.get("dynamic/text/spearman")
        easy, hard = (r.get(f"dynamic/mqar_{s}/mean_active_all_positions") for s in ("easy", "hard"))
        out.append(f"- {r['cell']}: Spearman(active count, token loss) on text = "
                   f"{'n/a' if rho is None else f'{rho:.3f}'}; MQAR easy {easy} vs hard {hard} active per layer.")
    return "\n".join(out) + ("\n\nMoE rows are skipped by the neuron analysis (no neurons); their experts-per-token "
                             "statistic is in the csv. A correlation near zero for the neuron-sparse FFN does not "
                             "support CFM's claim at this scale.")
