"""Config overrides, slot switching, validation errors, serialization."""

from __future__ import annotations

import pytest

from cfm_jax.config import Config, apply_override, diff, from_dict, resolve, split_pattern, to_dict
from cfm_jax.errors import UserError
from cfm_jax.layers.attention import AttentionConfig
from cfm_jax.layers.dense_ffn import DenseFFNConfig


def test_documented_override_forms():
    cfg = resolve("smoke", [
        "model.ffn=dense", "model.mixer=attention", "model.d_model=128", "model.n_layers=2",
        "model.ffn.activation=relu", "model.ffn.d_ff=96", "train.steps=200", "train.lr=1e-3", "train.seed=3",
        "data.task=mqar", "data.seq_len=256",
    ])
    assert cfg.model.d_model == 128 and cfg.model.n_layers == 2
    assert cfg.model.ffn == DenseFFNConfig(activation="relu", d_ff=96)
    assert isinstance(cfg.model.mixer, AttentionConfig)
    assert (cfg.train.steps, cfg.train.lr, cfg.train.seed) == (200, 1e-3, 3)
    assert (cfg.data.task, cfg.data.seq_len) == ("mqar", 256)


def test_switching_a_slot_resets_it_to_the_kinds_defaults():
    cfg = resolve("smoke", ["model.ffn.activation=relu", "model.ffn=dense", "model.mixer.n_heads=2"])
    assert cfg.model.ffn == DenseFFNConfig()  # the earlier field override is replaced
    assert cfg.model.mixer.n_heads == 2


def test_scale_presets_apply_before_user_overrides():
    assert resolve("smoke").model.d_model == 64
    assert resolve("smoke", ["model.d_model=96"]).model.d_model == 96
    assert resolve("cpu").model.d_model == 256


@pytest.mark.parametrize("override,fragment", [
    ("model.ffn=nonexistent", "unknown ffn kind 'nonexistent'; allowed: dense"),
    ("model.mixer=nope", "unknown mixer kind 'nope'; allowed: attention"),
    ("model.nope=1", "unknown key 'model.nope'"),
    ("model.ffn.nope=1", "unknown key 'model.ffn.nope'"),
    ("nope.x=1", "unknown key 'nope.x'"),
    ("model.d_model=abc", "model.d_model='abc' is not an int"),
    ("train.lr=fast", "train.lr='fast' is not a float"),
    ("model.tie_embeddings=maybe", "allowed: true, false"),
    ("model.ffn.activation=tanh", "allowed: swiglu, gelu, relu"),
    ("model.d_model=66", "n_heads=4 must be >= 1 and divide model.d_model=66"),
    ("model.d_model=100", "head_dim = d_model/n_heads = 25 must be even"),
    ("model.mixer.n_kv_heads=3", "n_kv_heads=3 must divide n_heads=4"),
    ("model.d_model=0", "model.d_model=0 must be > 0"),
    ("train.steps=-5", "train.steps=-5 must be > 0"),
    ("data.task=images", "unknown data.task 'images'"),
    ("data.path=/does/not/exist", "data.path='/does/not/exist' does not exist"),
    ("model.layers=attention*3", "not a multiple of the layer pattern length 3"),
    ("model.layers=attention+bogus", "unknown mixer kind 'bogus'"),
    ("justtext", "not of the form key=value"),
    ("model=3", "is a group of settings"),
])
def test_bad_overrides_give_one_line_errors(override, fragment):
    with pytest.raises(UserError) as info:
        resolve("smoke", [override])
    message = str(info.value)
    assert fragment in message and "\n" not in message


def test_impossible_mqar_setting_is_rejected():
    with pytest.raises(UserError, match="needs seq_len >= 256"):
        resolve("smoke", ["data.task=mqar", "data.num_kv_pairs=64", "data.eval_lengths=128"])


def test_layer_pattern_syntax():
    assert split_pattern("gla*3+attention") == ["gla", "gla", "gla", "attention"]
    assert split_pattern("a,b") == ["a", "b"]
    cfg = resolve("smoke", ["model.n_layers=4", "model.layers=attention*2"])
    assert cfg.model.layers == ("attention", "attention") and cfg.model.layer_kinds() == ("attention",) * 4


def test_round_trip_and_diff():
    cfg = resolve("smoke", ["model.ffn.activation=gelu", "data.eval_lengths=128,256", "model.layers=attention"])
    again = from_dict(to_dict(cfg))
    assert again == cfg and diff(cfg, again) == []
    other = apply_override(cfg, "model.d_model=32")
    assert diff(cfg, other) == ["model.d_model: 64 -> 32"]
    assert Config() == from_dict(to_dict(Config()))


def test_each_task_has_its_own_config_class_and_flat_overrides_reach_it():
    from cfm_jax.config import to_dict
    from cfm_jax.data.mix import MixConfig
    from cfm_jax.data.mqar import MQARConfig
    from cfm_jax.data.text import TextConfig

    assert type(resolve("smoke").data) is TextConfig
    a = resolve("smoke", ["data.task=mqar", "data.num_kv_pairs=4", "data.seq_len=64"])
    b = resolve("smoke", ["data.num_kv_pairs=4", "data.seq_len=64", "data.task=mqar"])  # data.task goes first
    assert a == b and type(a.data) is MQARConfig and a.data.num_kv_pairs == 4
    assert not hasattr(a.data, "path") and not hasattr(resolve("smoke").data, "num_kv_pairs")
    # switching keeps what both tasks have: seq_len, and (mqar -> mix) the MQAR fields
    mixed = resolve("smoke", ["data.task=mqar", "data.num_kv_pairs=4", "data.seq_len=64"], base=None)
    mixed = apply_override(mixed, "data.task=mix")
    assert type(mixed.data) is MixConfig and mixed.data.num_kv_pairs == 4 and mixed.data.seq_len == 64
    assert to_dict(a)["data"]["num_kv_pairs"] == 4 and "path" not in to_dict(a)["data"]
    with pytest.raises(UserError, match=r"unknown key 'data.path' for data.task=mqar \(a field of data.task=mix / text\)"):
        resolve("smoke", ["data.task=mqar", "data.path=x"])


def test_a_flat_data_config_from_before_task_classes_loads_with_its_task_fields():
    """config.json files written when `data` held every task's fields (committed run records)."""
    from cfm_jax.config import from_dict, to_dict

    old = to_dict(resolve("smoke", ["data.task=mqar", "data.num_kv_pairs=4"]))
    old["data"].update(path="", val_fraction=0.05, tokenizer="bytes", num_needles=4, needle_depth=-1.0,
                       copy_min_len=8, mix_weights=[2, 1, 1])
    cfg = from_dict(old)
    assert cfg == resolve("smoke", ["data.task=mqar", "data.num_kv_pairs=4"])
