"""BigScience's BLOOM: ALiBi, LayerNorms with bias (one after the embedding), fused per-head QKV, tanh-GELU."""

from polylm.config import ConfigView, read_head, read_heads
from polylm.family import DEFAULT_HEAD_NAMES, Family
from polylm.hookspecs import hookimpl
from polylm.ir import MLP, ALiBi, Attention, Block, Embedding, ModelIR, Norm

MODULE_NAMES = {
    "embed": "word_embeddings",
    "embed.norm": "word_embeddings_layernorm",
    "layers.{i}.attn_norm": "h.{i}.input_layernorm",
    "layers.{i}.attn.qkv": "h.{i}.self_attention.query_key_value",
    "layers.{i}.attn.o": "h.{i}.self_attention.dense",
    "layers.{i}.mlp_norm": "h.{i}.post_attention_layernorm",
    "layers.{i}.mlp.up": "h.{i}.mlp.dense_h_to_4h",
    "layers.{i}.mlp.down": "h.{i}.mlp.dense_4h_to_h",
    "final_norm": "ln_f",
}


def to_ir(config: ConfigView, task: str) -> ModelIR:
    hidden = config.positive("hidden_size", "n_embed")
    vocab = config.positive("vocab_size")
    heads, _, head_dim = read_heads(config, hidden, heads_keys=("n_head", "num_attention_heads"))
    norm = Norm("layer", config.get("layer_norm_epsilon", kind=float, default=1e-5), bias=True)
    attention = Attention(heads, heads, head_dim, ALiBi(), qkv_bias=True, out_bias=True,
                          qkv_layout="fused_per_kv_group")
    block = Block(norm, attention, norm, MLP(4 * hidden, "gelu_tanh", gated=False, bias=True),
                  residual_from_normed=config.get("apply_residual_connection_post_layernorm", kind=bool,
                                                  default=False))
    layers = config.positive("n_layer", "num_hidden_layers")
    return ModelIR("bloom", Embedding(vocab, hidden, norm=norm), block, layers, norm,
                   read_head(config, task, vocab_size=vocab, tie_default=True),
                   config.positive("seq_length", "max_position_embeddings", default=2048))


FAMILY = Family("bloom", ("bloom",), to_ir, MODULE_NAMES,
                head_names={**DEFAULT_HEAD_NAMES, "token-classification": "classifier"},
                base_prefixes=("transformer.",))


@hookimpl
def polylm_families() -> list[Family]:
    return [FAMILY]
