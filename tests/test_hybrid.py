"""Hybrid layer patterns: syntax and presets, per-layer kinds and configs, errors, a mixed-state LM
decoding token by token like its forward pass, and one training step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from baselines.linear_attention import LinearAttention
from baselines.mla import MLA
from baselines.sliding_window import SlidingWindow
from cfm_jax import registry
from cfm_jax.config import (
    LAYER_PRESETS, ModelConfig, TrainConfig, format_pattern, from_dict, layer_pattern, resolve, to_dict,
)
from cfm_jax.errors import UserError
from cfm_jax.layers.attention import Attention
from cfm_jax.layers.model import LanguageModel
from cfm_jax.train import make_optimizer, make_train_step

TINY = ["model.d_model=32"]


def test_pattern_syntax_and_presets():
    assert layer_pattern("linear_attention*3+attention") == ("linear_attention",) * 3 + ("attention",)
    assert layer_pattern("mla, attention") == ("mla", "attention")
    assert layer_pattern("minimax") == ("linear_attention",) * 7 + ("attention",)
    assert layer_pattern("jamba") == ("mamba",) * 4 + ("attention",) + ("mamba",) * 3
    assert layer_pattern("samba") == ("mamba", "sliding_window")
    assert format_pattern(layer_pattern("jamba")) == "mamba*4+attention+mamba*3"
    for name, pattern in LAYER_PRESETS.items():  # presets of registered kinds resolve and tile
        if all(kind in registry.kinds("mixer") for kind in pattern):
            cfg = resolve("smoke", [*TINY, f"model.layers={name}", f"model.n_layers={2 * len(pattern)}"])
            assert cfg.model.layer_kinds() == pattern * 2


def test_each_layer_gets_its_kind_and_config():
    full = resolve("smoke", [
        *TINY, "model.n_layers=8", "model.mixer=mla", "model.mixer.latent_dim=8",
        "model.layers=linear_attention*2+sliding_window+mla",
        "model.mixers.sliding_window.window=3", "model.mixers.linear_attention.feature_map=taylor",
        "model.mixers.linear_attention.d_key=4", "model.mixers.sliding_window.sinks=1",
    ])
    assert from_dict(to_dict(full)) == full  # config.json round trip keeps the per-kind configs
    cfg = full.model
    model = abstract_model(cfg)
    expected = [LinearAttention, LinearAttention, SlidingWindow, MLA] * 2
    assert [type(block.mixer) for block in model.blocks] == expected
    assert model.blocks[2].mixer.cfg.window == 3 and model.blocks[2].mixer.cfg.sinks == 1
    assert model.blocks[0].mixer.cfg.feature_map == "taylor" and model.blocks[3].mixer.cfg.latent_dim == 8
    assert [c.kind for c in cfg.mixers] == ["linear_attention", "sliding_window"]  # one entry per kind


def test_pattern_kind_without_entry_uses_defaults():
    cfg = resolve("smoke", ["model.n_layers=4", "model.layers=linear_attention*3+attention"]).model
    assert cfg.layer_mixer(0) == registry.default_config("mixer", "linear_attention")
    assert cfg.layer_mixer(3) is cfg.mixer
    assert [type(abstract_model(cfg).blocks[i].mixer) for i in (0, 3)] == [LinearAttention, Attention]


def abstract_model(cfg: ModelConfig) -> LanguageModel:
    """The model's structure with shape-only parameters (nothing computed)."""
    return nnx.eval_shape(lambda: LanguageModel(cfg, vocab_size=11, rngs=nnx.Rngs(0)))


@pytest.mark.parametrize("overrides,fragment", [
    (["model.layers=attention+nope"], "unknown mixer kind 'nope' in model.layers; allowed: attention,"),
    (["model.layers=attention+nope"], "presets: jamba, minimax, samba"),
    (["model.layers=minimax"], "model.n_layers=2 is not a multiple of the layer pattern length 8 "
                                "(linear_attention*7+attention)"),
    (["model.layers=sliding_window+attention", "model.mixers.sliding_window.window=0"],
     "model.mixers.sliding_window.window=0 must be >= 1"),
    (["model.mixers.sliding_window.window=4"],
     "model.mixers.sliding_window is unused: sliding_window is not in model.layers=attention*2"),
    (["model.layers=mla+attention", "model.mixers.attention.n_heads=2"],
     "model.mixers.attention is unused: attention layers use model.mixer"),
    (["model.mixers.nope.x=1"], "unknown mixer kind 'nope'; allowed:"),
    (["model.mixers.mla=1"], "set one field of a pattern kind"),
    (["model.layers=mla+attention", "model.mixers.mla.nope=1"],
     "unknown key 'model.mixers.mla.nope'; allowed here: model.mixers.mla.n_heads"),
])
def test_bad_patterns_give_one_line_errors(overrides, fragment):
    with pytest.raises(UserError) as info:
        resolve("smoke", overrides)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def hybrid_model(layers=("linear_attention", "sliding_window", "mla", "attention")) -> LanguageModel:
    cfg = ModelConfig(d_model=32, n_layers=len(layers), layers=layers,
                      mixers=(registry.get("mixer", "sliding_window").config_cls(window=3, sinks=1),))
    cfg.validate()
    return LanguageModel(cfg, vocab_size=13, rngs=nnx.Rngs(0))


def test_hybrid_decode_matches_forward():
    """Every layer carries its own kind of state (recurrent, ring buffer, latent, KV cache)."""
    model, length = hybrid_model(), 9
    tokens = jax.random.randint(jax.random.key(0), (2, length), 0, 13)
    logits, _ = nnx.jit(lambda m, t: m(t))(model, tokens)
    graphdef, params = nnx.split(model)

    @jax.jit
    def run(params, tokens):
        m = nnx.merge(graphdef, params)
        _, out = jax.lax.scan(lambda s, t: m.step(t, s)[::-1], m.init_state(2, length), tokens.T)
        return jnp.moveaxis(out, 0, 1)

    np.testing.assert_allclose(run(params, tokens), logits, rtol=1e-4, atol=1e-4)


def test_hybrid_trains_one_step():
    model = hybrid_model(("linear_attention", "sliding_window"))
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx, _ = make_optimizer(TrainConfig(steps=10, warmup_steps=0, lr=1e-2))
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 13)
    batch = {"inputs": tokens[:, :-1], "labels": tokens[:, 1:]}
    new_params, _, _, metrics = make_train_step(graphdef, tx)(params, rest, tx.init(params), batch, 0)
    assert np.isfinite(float(metrics["loss"]))
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.any(a != b)), params, new_params)))


def test_cli_rejects_unknown_kind_in_pattern(tmp_path, capsys):
    from cfm_jax.cli import main

    workdir = tmp_path / "w"
    assert main(["train", "--workdir", str(workdir), "--scale", "smoke", "model.layers=attention+nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown mixer kind 'nope' in model.layers; allowed:") and "\n" not in err
    assert not workdir.exists()
