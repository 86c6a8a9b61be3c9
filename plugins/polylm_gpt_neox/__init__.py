"""EleutherAI's GPT-NeoX (Pythia): fused per-head QKV, partial RoPE, LayerNorms with bias, a GELU MLP, and a
parallel block with a norm per branch (or a sequential one)."""

from dataclasses import replace

from polylm.config import ConfigView, read_activation, read_head, read_heads, read_rope
from polylm.family import DEFAULT_HEAD_NAMES, Family
from polylm.hookspecs import hookimpl
from polylm.ir import MLP, Attention, Block, Embedding, ModelIR, Norm

MODULE_NAMES = {
    "embed": "embed_in",
    "layers.{i}.attn_norm": "layers.{i}.input_layernorm",
    "layers.{i}.attn.qkv": "layers.{i}.attention.query_key_value",
    "layers.{i}.attn.o": "layers.{i}.attention.dense",
    "layers.{i}.mlp_norm": "layers.{i}.post_attention_layernorm",
    "layers.{i}.mlp.up": "layers.{i}.mlp.dense_h_to_4h",
    "layers.{i}.mlp.down": "layers.{i}.mlp.dense_4h_to_h",
    "final_norm": "final_layer_norm",
}
#: Pythia-era names of the RoPE keys, read (as transformers does) where the config gives the new name nowhere.
LEGACY_ROPE_KEYS = {"rotary_pct": "partial_rotary_factor", "rotary_emb_base": "rope_theta"}


def to_ir(config: ConfigView, task: str) -> ModelIR:
    hidden = config.positive("hidden_size")
    vocab = config.positive("vocab_size")
    heads, _, head_dim = read_heads(config, hidden)
    norm = Norm("layer", config.get("layer_norm_eps", kind=float, default=1e-5), bias=True)
    bias = config.get("attention_bias", kind=bool, default=True)
    attention = Attention(heads, heads, head_dim, read_rope(_with_legacy_rope_keys(config), default_fraction=0.25),
                          qkv_bias=bias, out_bias=bias, qkv_layout="fused_per_kv_group")
    mlp = MLP(config.positive("intermediate_size"), read_activation(config, "hidden_act", default="gelu"),
              gated=False, bias=True)
    block = Block(norm, attention, norm, mlp, parallel=config.get("use_parallel_residual", kind=bool, default=True))
    layers = config.positive("num_hidden_layers")
    head = read_head(config, task, vocab_size=vocab, tie_default=False)
    if task == "token-classification":  # GPTNeoXForTokenClassification's classifier always has a bias
        head = replace(head, bias=True)
    return ModelIR("gpt_neox", Embedding(vocab, hidden), block, layers, norm, head,
                   config.positive("max_position_embeddings", default=2048))


def _with_legacy_rope_keys(config: ConfigView) -> ConfigView:
    given = config.rope_parameters()
    legacy = {new: config.get(old, kind=float) for old, new in LEGACY_ROPE_KEYS.items()
              if config.has(old) and not given.has(new)}
    return ConfigView({**config.data, **legacy}, config.path)


FAMILY = Family("gpt_neox", ("gpt_neox",), to_ir, MODULE_NAMES,
                head_names={**DEFAULT_HEAD_NAMES, "causal-lm": "embed_out", "token-classification": "classifier"},
                base_prefixes=("gpt_neox.",),
                ignored_tensors=(r"(^|\.)rotary_emb\.inv_freq$", r"\.attention\.(masked_)?bias$"))


@hookimpl
def polylm_families() -> list[Family]:
    return [FAMILY]
