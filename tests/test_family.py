"""`polylm.family.llama_like`: Llama's mapping by default, and each keyword changes only what it names."""

from dataclasses import replace

import pytest

from polylm.config import ConfigView
from polylm.errors import ConfigError
from polylm.family import llama_like
from polylm.ir import MLP, Attention, Block, Embedding, Head, ModelIR, Norm, RoPE

CONFIG = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=320)


def view(**changes):
    return ConfigView({**CONFIG, **changes}, "m/config.json")


def test_defaults_are_llamas():
    norm = Norm("rms", 1e-6)
    attention = Attention(4, 2, 16, RoPE(10000.0, 2048))
    expected = ModelIR("llama", Embedding(320, 64), Block(norm, attention, norm, MLP(96, "silu", gated=True)), 3,
                       norm, Head("causal-lm", 320), 2048)
    assert llama_like(view(), "causal-lm", family="llama") == expected


def test_norm_template_takes_its_eps_from_the_first_key_present():
    template = Norm("layer", 1e-5, weight_offset=1.0, bias=True)
    keys = ("norm_eps", "layer_norm_eps")
    assert llama_like(view(), "causal-lm", family="x", norm=template, eps_keys=keys).final_norm == template
    ir = llama_like(view(layer_norm_eps=1e-3), "causal-lm", family="x", norm=template, eps_keys=keys)
    assert ir.block.attn_norm == ir.block.mlp_norm == ir.final_norm == replace(template, eps=1e-3)


def test_rope_keywords_are_defaults_of_the_config_keys():
    ir = llama_like(view(), "causal-lm", family="x", default_theta=1e5, default_fraction=0.5, interleaved=True)
    assert ir.attention.position == RoPE(1e5, 2048, rotary_fraction=0.5, interleaved=True)
    ir = llama_like(view(rope_theta=500.0, partial_rotary_factor=0.25), "causal-lm", family="x", default_theta=1e5,
                    default_fraction=0.5)
    assert (ir.attention.position.theta, ir.attention.rotary_dim) == (500.0, 4)


def test_fixed_biases_do_not_read_their_keys():
    assert llama_like(view(attention_bias=True), "causal-lm", family="x").attention.out_bias
    ir = llama_like(view(attention_bias="junk", mlp_bias="junk"), "causal-lm", family="x", qkv_bias=True,
                    out_bias=False, mlp_bias=False)
    assert (ir.attention.qkv_bias, ir.attention.out_bias, ir.block.mlp.bias) == (True, False, False)
    with pytest.raises(ConfigError, match="m/config.json: key 'attention_bias' must be true or false"):
        llama_like(view(attention_bias="junk"), "causal-lm", family="x", qkv_bias=True)


def test_activation_is_hidden_acts_default_or_a_reader():
    assert llama_like(view(), "causal-lm", family="x", activation="relu2", gated=False).block.mlp == MLP(
        96, "relu2", gated=False)
    assert llama_like(view(hidden_act="gelu_new"), "causal-lm", family="x").block.mlp.activation == "gelu_tanh"
    ir = llama_like(view(hidden_act="junk"), "causal-lm", family="x", activation=lambda config: "gelu")
    assert ir.block.mlp.activation == "gelu"


def test_context_default_applies_to_the_model_not_to_ropes_max_positions():
    ir = llama_like(view(), "causal-lm", family="x", tie_default=True, context_default=8192)
    assert (ir.max_positions, ir.attention.position.max_positions, ir.head.tied_to_embedding) == (8192, 2048, True)
    ir = llama_like(view(max_position_embeddings=300), "causal-lm", family="x", context_default=8192)
    assert (ir.max_positions, ir.attention.position.max_positions) == (300, 300)
