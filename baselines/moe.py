"""FFN `moe`: a mixture of SwiGLU (or ReGLU, or ReLU: `expert_activation`) experts behind a float32 router (Switch / Mixtral / DeepSeekMoE).

    cfm-jax train --workdir W --scale smoke model.ffn=moe model.ffn.routing=topp model.ffn.n_shared=1

Routing (baselines/moe_routing.py): top-k or top-p over softmax or sigmoid scores; balancing by the
Switch loss, the router z-loss and loss-free selection biases, each on or off. Dispatch
(baselines/moe_dispatch.py): dropless (default; per-token, hence causal) or capacity-limited
(drops depend on the other tokens of a group, later ones included: not causal). Expert parallelism
(baselines/moe_parallel.py) switches on when a mesh with an `expert` axis is active (`jax.set_mesh`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from baselines import moe_dispatch as dispatch
from baselines import moe_parallel as parallel
from baselines import moe_routing as routing
from cfm_jax.errors import UserError
from cfm_jax.layers.common import linear, make_aux, normal_init, output_init, training_step_variable
from cfm_jax.registry import LayerContext, SlotConfig, register


@dataclass(frozen=True)
class MoEConfig(SlotConfig):
    n_experts: int = 8  # routed experts E
    # Hidden width of each routed and each shared expert; 0 = the dense SwiGLU default width divided
    # by (top_k + n_shared), rounded up to a multiple of 8 (about the dense FFN's active FLOPs).
    d_expert: int = 0
    # Each expert: swiglu silu(x W_g) * (x W_u); reglu relu(x W_g) * (x W_u); relu relu(x W_u) (two
    # matrices). reglu/relu make the MoE the like-for-like rival of neuron_sparse's reglu/relu forms.
    expert_activation: Literal["swiglu", "reglu", "relu"] = "swiglu"
    n_shared: int = 0  # always-on shared experts (DeepSeekMoE), added to the routed output
    routing: Literal["topk", "topp"] = "topk"  # fixed k per token, or dynamic k (top-p)
    top_k: int = 2  # topk: experts per token (also the k in the default d_expert)
    top_p: float = 0.4  # topp: add experts by descending score until their probability mass >= p
    max_k: int = 4  # topp: at most this many experts per token
    score: Literal["softmax", "sigmoid"] = "softmax"  # router scores from the float32 logits
    renormalize: bool = True  # weights = chosen scores / their sum (Mixtral); false = raw scores (Switch)
    jitter: float = 0.0  # training only: router input times U(1-jitter, 1+jitter) (Switch: 0.01)
    aux_loss_weight: float = 0.01  # Switch load-balance loss E*sum_e f_e P_e (1 at balance); 0 = off
    z_loss_weight: float = 1e-3  # router z-loss mean(logsumexp(logits)^2) (ST-MoE); 0 = off
    bias_update_rate: float = 0.0  # loss-free balancing: u in b += u*sign(mean(c) - c) (DeepSeek-V3: 1e-3); 0 = off
    # dropless: every assignment computed (causal). capacity: C = ceil(T*K/E * capacity_factor)
    # slots per expert per group, the rest dropped (not causal: later tokens can take a slot first).
    dispatch: Literal["dropless", "capacity"] = "dropless"
    capacity_factor: float = 1.25  # capacity dispatch: slack over a perfectly even load; E/K never drops
    group_size: int = 0  # capacity dispatch: tokens per routing group; 0 = one group per sequence

    def slots(self) -> int:
        """K: selection slots per token (the most experts one token can use)."""
        return self.top_k if self.routing == "topk" else self.max_k

    def gated(self) -> bool:
        return self.expert_activation != "relu"

    def width(self, d_model: int) -> int:
        if self.d_expert:
            return self.d_expert
        # The dense default of the same form (SwiGLU/ReGLU 8d/3, ReLU 4d), split over k + shared experts.
        dense = -(-(8 * d_model // 3) // 8) * 8 if self.gated() else 4 * d_model
        return -(-dense // (self.top_k + self.n_shared) // 8) * 8

    def validate_mesh(self, axes: dict[str, int]) -> None:
        from baselines.moe_parallel import check_mesh

        check_mesh(self, axes.get("expert", 1))

    def validate(self, d_model: int) -> None:
        e = self.n_experts
        checks = [
            (e >= 2, f"model.ffn.n_experts={e} must be >= 2"),
            (self.d_expert >= 0, f"model.ffn.d_expert={self.d_expert} must be >= 0 (0 = default width)"),
            (self.n_shared >= 0, f"model.ffn.n_shared={self.n_shared} must be >= 0"),
            (1 <= self.top_k <= e, f"model.ffn.top_k={self.top_k} must be in [1, n_experts={e}]"),
            (0 < self.top_p <= 1, f"model.ffn.top_p={self.top_p} must be in (0, 1]"),
            (1 <= self.max_k <= e, f"model.ffn.max_k={self.max_k} must be in [1, n_experts={e}]"),
            (0 <= self.jitter < 1, f"model.ffn.jitter={self.jitter} must be in [0, 1)"),
            (self.aux_loss_weight >= 0, f"model.ffn.aux_loss_weight={self.aux_loss_weight} must be >= 0"),
            (self.z_loss_weight >= 0, f"model.ffn.z_loss_weight={self.z_loss_weight} must be >= 0"),
            (self.bias_update_rate >= 0, f"model.ffn.bias_update_rate={self.bias_update_rate} must be >= 0"),
            (self.capacity_factor > 0, f"model.ffn.capacity_factor={self.capacity_factor} must be > 0"),
            (self.group_size >= 0, f"model.ffn.group_size={self.group_size} must be >= 0 (0 = per sequence)"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)


class RouterBias(nnx.Variable):
    """Loss-free balancing bias (E,): used to select experts, never in a weight; not a Param, so the
    optimizer leaves it alone and the trainer carries what the forward pass writes."""


@register("ffn", "moe", MoEConfig)
class MoE(nnx.Module):
    def __init__(self, cfg: MoEConfig, ctx: LayerContext, *, rngs: nnx.Rngs):
        self.cfg, self.layer = cfg, ctx.layer
        d, f, e = ctx.d_model, cfg.width(ctx.d_model), cfg.n_experts
        init, out_init = normal_init(ctx.init_std), output_init(ctx)
        self.router = nnx.Param(init(rngs.params(), (d, e), jnp.float32))
        self.w_gate = nnx.Param(init(rngs.params(), (e, d, f))) if cfg.gated() else None
        self.w_up = nnx.Param(init(rngs.params(), (e, d, f)))
        self.w_down = nnx.Param(out_init(rngs.params(), (e, f, d)))
        if cfg.n_shared:  # n_shared experts of width f = one expert of width n_shared * f
            self.shared_gate = linear(d, cfg.n_shared * f, init, rngs) if cfg.gated() else None
            self.shared_up = linear(d, cfg.n_shared * f, init, rngs)
            self.shared_down = linear(cfg.n_shared * f, d, out_init, rngs)
        self.bias = RouterBias(jnp.zeros((e,), jnp.float32)) if cfg.bias_update_rate > 0 else None
        self.train_step = training_step_variable() if cfg.jitter > 0 else None  # seeds the jitter
        self.deterministic = True  # model.train() sets False: jitter and bias updates only then
        parallel.check_mesh(cfg)

    def experts(self) -> dispatch.Experts:
        up = self.w_up[...]
        gate = self.w_gate[...] if self.w_gate is not None else jnp.zeros((*up.shape[:2], 0), up.dtype)
        return dispatch.Experts(gate, up, self.w_down[...], self.cfg.expert_activation)

    def route(self, x: jax.Array) -> tuple[routing.Routing, jax.Array]:
        """x: (N, d_model) -> (the routing of each token, float32 router logits (N, E))."""
        cfg = self.cfg
        h = x.astype(jnp.float32)
        if cfg.jitter > 0 and not self.deterministic:
            key = jax.random.fold_in(jax.random.key(self.layer), self.train_step[...])
            h = h * jax.random.uniform(key, h.shape, jnp.float32, 1 - cfg.jitter, 1 + cfg.jitter)
        logits = h @ self.router[...].astype(jnp.float32)  # float32 even under model.dtype=bfloat16
        bias = None if self.bias is None else self.bias[...]
        r = routing.route(logits, bias, score=cfg.score, mode=cfg.routing, k=cfg.slots(),
                          top_p=cfg.top_p, renormalize=cfg.renormalize)
        return r, logits

    def dispatch_tokens(self, x: jax.Array, r: routing.Routing, batch: int, seq: int) -> tuple[jax.Array, jax.Array]:
        """x: (N, d_model) tokens of `batch` sequences of `seq` -> (routed output (N, d), kept (N, K))."""
        cfg = self.cfg
        if parallel.expert_axis_size() > 1:
            return parallel.expert_parallel_dispatch(x, r, self.experts(), cfg, batch, seq)
        if cfg.dispatch == "dropless":
            return dispatch.dropless_dispatch(x, r.experts, r.weights, r.valid, self.experts())
        groups = dispatch.group_shape(batch, seq, cfg.group_size)
        cap = dispatch.capacity(groups[1], cfg.slots(), cfg.n_experts, cfg.capacity_factor)
        return dispatch.capacity_dispatch(x, r.experts, r.weights, r.valid, self.experts(), groups=groups, cap=cap)

    def __call__(self, x: jax.Array):
        """x: (batch, seq, d_model) -> (y: (batch, seq, d_model), aux)."""
        cfg = self.cfg
        b, s, d = x.shape
        tokens = x.reshape(b * s, d)
        r, logits = self.route(tokens)
        y, kept = self.dispatch_tokens(tokens, r, b, s)
        if cfg.n_shared:
            y = y + self.shared_experts(tokens)
        load = routing.expert_load(r, cfg.n_experts)
        aux, z = routing.switch_aux_loss(load, r.probs), routing.router_z_loss(logits)
        stats = routing.routing_stats(r, kept, load, seq=s, n_shared=cfg.n_shared,
                                      params_per_expert=self.params_per_expert(), router_params=self.router.size)
        stats.update(aux_loss=aux, z_loss=z)
        if self.bias is not None:
            stats["bias_range"] = jnp.max(self.bias[...]) - jnp.min(self.bias[...])  # the bias used
            if not self.deterministic:  # the trainer carries this into the next step
                # A new Variable, not an in-place write: the trainer merges the model inside
                # jax.value_and_grad, where writing into a Variable made outside it is refused.
                self.bias = RouterBias(routing.bias_update(self.bias[...], load, cfg.bias_update_rate))
        loss = cfg.aux_loss_weight * aux + cfg.z_loss_weight * z
        return y.reshape(b, s, d).astype(x.dtype), make_aux(loss, **stats)

    def shared_experts(self, tokens: jax.Array) -> jax.Array:
        """The always-on experts as one expert of their total width: tokens (N, d_model) -> (N, d_model)."""
        up = self.shared_up(tokens)
        gate = self.shared_gate(tokens) if self.shared_gate is not None else up[..., :0]
        return self.shared_down(dispatch.hidden(gate, up, self.cfg.expert_activation))

    def expert_forward(self, x: jax.Array, hook) -> jax.Array:
        """Analysis only (bricks at expert granularity): x (batch, seq, d_model) -> y (batch, seq, d_model)
        with every expert computed for every token and the combine weights w (batch, seq, E) (0 where an
        expert was not chosen) rewritten by hook(w) first. No capacity drops (as dropless dispatch);
        the shared experts are added unchanged. Cost E/k times a routed forward: small models only."""
        b, s, d = x.shape
        tokens = x.reshape(b * s, d)
        r, _ = self.route(tokens)
        w = jnp.zeros((b * s, self.cfg.n_experts), jnp.float32)
        w = w.at[jnp.arange(b * s)[:, None], r.experts].add(r.weights).reshape(b, s, -1)
        every = dispatch.expert_ffn(jnp.broadcast_to(tokens, (self.cfg.n_experts, b * s, d)), self.experts())
        y = jnp.einsum("ne,end->nd", hook(w).reshape(b * s, -1).astype(every.dtype), every)
        if self.cfg.n_shared:
            y = y + self.shared_experts(tokens)
        return y.reshape(b, s, d).astype(x.dtype)

    # --- accounting ---

    def params_per_expert(self) -> int:
        _, d, f = self.w_up.shape
        return (3 if self.cfg.gated() else 2) * d * f

    def param_count(self) -> int:
        """Router + routed + shared expert parameters."""
        return self.router.size + (self.cfg.n_experts + self.cfg.n_shared) * self.params_per_expert()

    def active_params_per_token(self) -> int:
        """Router + K routed (top-p: max_k, an upper bound; the measured mean is a statistic) + shared."""
        return self.router.size + (self.cfg.slots() + self.cfg.n_shared) * self.params_per_expert()

    def flops_per_token(self) -> int:
        """Forward FLOPs per token of the useful work (2 per multiply-add), as active params."""
        return 2 * self.active_params_per_token()
