"""The language model: token embedding -> blocks -> final RMSNorm -> vocabulary head."""

from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp
from flax import nnx

from cfm_jax.config import ModelConfig
from cfm_jax.layers.block import Block
from cfm_jax.layers.common import Linear, RMSNorm, normal_init
from cfm_jax.layers.precision import DTYPES
from cfm_jax.registry import LayerContext


class LanguageModel(nnx.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int, *, rngs: nnx.Rngs):
        self.cfg, self.vocab_size = cfg, vocab_size
        d = cfg.d_model
        # nnx.Embed fixes its output dtype at init (to the float32 table's unless told): with
        # model.dtype=bfloat16 it must hand bfloat16 activations to the blocks.
        self.embed = nnx.Embed(vocab_size, d, embedding_init=normal_init(cfg.init_std), dtype=DTYPES[cfg.dtype], rngs=rngs)
        self.blocks = nnx.List(
            Block(cfg.layer_mixer(i), cfg.ffn if cfg.use_ffn else None, LayerContext(d, cfg.n_layers, i, cfg.init_std), cfg.norm_eps, rngs=rngs)
            for i in range(cfg.n_layers)
        )
        self.final_norm = RMSNorm(d, epsilon=cfg.norm_eps, rngs=rngs)
        self.head = None if cfg.tie_embeddings else Linear(
            d, vocab_size, use_bias=False, kernel_init=normal_init(cfg.init_std), rngs=rngs
        )

    def logits(self, h: jax.Array) -> jax.Array:
        h = self.final_norm(h)
        return self.embed.attend(h) if self.head is None else self.head(h)

    def __call__(self, tokens: jax.Array, neuron_hook=None, positions: jax.Array | None = None):
        """tokens: (batch, seq) int -> (logits: (batch, seq, vocab) fp32, aux).

        aux = {"loss": sum of every slot's auxiliary loss, "stats": {name: value}} where stats holds
        each slot statistic per layer (`ffn/NAME/layerI`) and its mean over layers (`ffn/NAME`).
        neuron_hook(layer, ffn, a) -> a' (analysis tools only) rewrites each FFN's intermediate
        activations a: (batch, seq, d_ff); see Block.
        positions: (batch, P) int: compute the output head only there -> logits (batch, P, vocab) (the
        scored positions of a task that scores few, e.g. MQAR's answers: the head is most of the
        compute at a large vocabulary).
        """
        h = self.embed(tokens)
        per_layer = []
        for i, block in enumerate(self.blocks):
            hook = None if neuron_hook is None else functools.partial(neuron_hook, i, block.ffn)
            h, aux = block(h, neuron_hook=hook)
            per_layer.append(aux)
        if positions is not None:
            h = jnp.take_along_axis(h, positions[..., None], axis=1)  # (batch, P, d)
        return self.logits(h).astype(jnp.float32), collect_aux(per_layer)

    # --- decoding ---

    def init_state(self, batch: int, max_len: int) -> list:
        """One decoding state per layer (KV cache, recurrent state, ...)."""
        return [block.mixer.init_state(batch, max_len) for block in self.blocks]

    def step(self, token: jax.Array, state: list):
        """One token per sequence. token: (batch,) int -> (logits: (batch, vocab), new state)."""
        h = self.embed(token)
        new_state = []
        for block, layer_state in zip(self.blocks, state):
            h, layer_state = block.step(h, layer_state)
            new_state.append(layer_state)
        return self.logits(h).astype(jnp.float32), new_state


def collect_aux(per_layer: list[dict]) -> dict:
    """[{slot: {"loss", "stats"}} per layer] -> {"loss": total, "stats": per-layer + layer means}."""
    loss = jnp.zeros((), jnp.float32)
    stats: dict[str, jax.Array] = {}
    grouped: dict[str, list[jax.Array]] = {}
    for i, layer_aux in enumerate(per_layer):
        for slot, aux in layer_aux.items():
            loss = loss + aux["loss"]
            for name, value in aux["stats"].items():
                stats[f"{slot}/{name}/layer{i}"] = value
                grouped.setdefault(f"{slot}/{name}", []).append(value)
    for name, values in grouped.items():
        stats[name] = jnp.mean(jnp.stack(values))
    return {"loss": loss, "stats": stats}


def param_counts(model: LanguageModel) -> dict[str, int]:
    """Total, embedding (token embedding + untied head) and non-embedding parameter counts."""
    def size(tree) -> int:
        return int(sum(x.size for x in jax.tree.leaves(tree)))

    total = size(nnx.state(model, nnx.Param))
    embedding = size(nnx.state(model.embed, nnx.Param))
    if model.head is not None:
        embedding += size(nnx.state(model.head, nnx.Param))
    return {"params_total": total, "params_embedding": embedding, "params_non_embedding": total - embedding}


def forward_flops_per_token(model: LanguageModel, context_len: int) -> float:
    """Analytic forward FLOPs per token (2 per multiply-add): every block's mixer at `context_len`
    (training on length L: L / 2 on average for causal attention) and FFN, plus the output head."""
    total = 2 * model.cfg.d_model * model.vocab_size
    for block in model.blocks:
        total += block.mixer.flops_per_token(max(1, context_len))
        if block.ffn is not None:
            total += block.ffn.flops_per_token()
    return float(total)


def ffn_active_params(ffn, layer_stats: dict) -> float:
    """One rule for every FFN: the weights a sparse kernel must read per token, from that layer's
    measured statistics. MoE: its measured router + routed + shared expert weights; a neuron FFN: its
    `active_params_per_token` at the measured activation (and gate) ratio; otherwise every weight."""
    if "active_params_per_token" in layer_stats:
        return float(layer_stats["active_params_per_token"])
    accepts = inspect.signature(ffn.active_params_per_token).parameters
    return float(ffn.active_params_per_token(**{k: layer_stats[k] for k in ("activation_ratio", "gate_ratio")
                                                  if k in accepts and k in layer_stats}))


def efficiency(model: LanguageModel, stats: dict, train_len: int, context_len: int = 4096) -> dict:
    """Active parameters and FLOPs per token by one rule (ffn_active_params), weight bytes, memory.

    params_active_per_token: non-embedding parameters outside the FFNs + each FFN's active weights.
    ffn_flops_per_token: 2 x the FFNs' active weights (what a sparse kernel computes; dense FFNs: all).
    mixer_flops_per_token: the mixers at the training length (context train_len / 2, the mean over a
    causal sequence); head_flops_per_token: the output projection; flops_per_token: their sum.
    inference_memory_{context_len}_bytes: fp32 weights + decoding state at that context.
    """
    counts = param_counts(model)
    ffn_total, ffn_active = 0, 0.0
    for i, block in enumerate(model.blocks):
        if block.ffn is None:
            continue
        ffn_total += sum(x.size for x in jax.tree.leaves(nnx.state(block.ffn, nnx.Param)))
        layer = {k.split("/")[1]: v for k, v in stats.items() if k.startswith("ffn/") and k.endswith(f"/layer{i}")}
        ffn_active += ffn_active_params(block.ffn, layer)
    mixer = sum(block.mixer.flops_per_token(max(1, train_len // 2)) for block in model.blocks)
    head = 2 * model.cfg.d_model * model.vocab_size
    state = sum(block.mixer.state_bytes(context_len) for block in model.blocks)
    return {
        "params_active_per_token": float(counts["params_non_embedding"] - ffn_total + ffn_active),
        "ffn_params_active_per_token": ffn_active,
        "ffn_flops_per_token": 2 * ffn_active,
        "mixer_flops_per_token": float(mixer),
        "head_flops_per_token": float(head),
        "flops_per_token": float(2 * ffn_active + mixer + head),
        "weight_bytes": {"fp32": 4 * counts["params_total"], "bf16": 2 * counts["params_total"],
                         "int8": counts["params_total"]},
        f"inference_memory_{context_len}_bytes": 4 * counts["params_total"] + int(state),
    }


def build_model(cfg: ModelConfig, vocab_size: int, seed: int) -> LanguageModel:
    return LanguageModel(cfg, vocab_size, rngs=nnx.Rngs(seed))
