"""TII's Falcon in transformers' three layouts: classic (falcon-rw: sequential, one fused q/k/v per head),
multi-query (falcon-7b: one key/value head, parallel block with one norm) and the new decoder architecture
(falcon-40b/180b: key/value groups, parallel block with one or two norms); ALiBi scaled with the logits, or RoPE."""

from polylm.config import ConfigView, read_activation, read_head, read_rope
from polylm.errors import Declined
from polylm.family import DEFAULT_HEAD_NAMES, Family, Stored
from polylm.hookspecs import hookimpl
from polylm.ir import MLP, ALiBi, Attention, Block, Embedding, ModelIR, Norm

QKV = ("layers.{i}.attn.q", "layers.{i}.attn.k", "layers.{i}.attn.v")
FUSED = "h.{i}.self_attention.query_key_value"
MODULE_NAMES = {
    "embed": "word_embeddings",
    "layers.{i}.attn_norm": Stored("h.{i}.input_layernorm", "h.{i}.ln_attn"),
    "layers.{i}.attn.qkv": FUSED,
    **{name: Stored(FUSED, stacked=QKV) for name in QKV},  # one key/value head: rows [q heads…, k, v]
    "layers.{i}.attn.o": "h.{i}.self_attention.dense",
    "layers.{i}.mlp_norm": Stored("h.{i}.post_attention_layernorm", "h.{i}.ln_mlp"),
    "layers.{i}.mlp.up": "h.{i}.mlp.dense_h_to_4h",
    "layers.{i}.mlp.down": "h.{i}.mlp.dense_4h_to_h",
    "final_norm": "ln_f",
}


def to_ir(config: ConfigView, task: str) -> ModelIR:
    hidden = config.positive("hidden_size", "n_embed")
    vocab = config.positive("vocab_size")
    heads = config.positive("num_attention_heads", "n_head")
    new = config.get("new_decoder_architecture", kind=bool, default=False)
    parallel = config.get("parallel_attn", kind=bool, default=True)
    if new and not parallel:
        raise Declined("new_decoder_architecture with parallel_attn = false (transformers cannot run it either)")
    if new:
        kv_heads = config.positive("num_kv_heads", default=heads)
    else:
        kv_heads = 1 if config.get("multi_query", kind=bool, default=True) else heads
    bias = config.get("bias", kind=bool, default=False)
    position = ALiBi(scaled=True) if config.get("alibi", kind=bool, default=False) else read_rope(config)
    attention = Attention(heads, kv_heads, hidden // heads, position, qkv_bias=bias, out_bias=bias,
                          qkv_layout="separate" if kv_heads == 1 else "fused_per_kv_group")
    norm = Norm("layer", config.get("layer_norm_epsilon", kind=float, default=1e-5), bias=True)
    two_norms = not parallel or (new and config.positive("num_ln_in_parallel_attn", default=2) == 2)
    mlp = MLP(config.positive("ffn_hidden_size", default=4 * hidden),
              read_activation(config, "activation", default="gelu"), gated=False, bias=bias)
    return ModelIR("falcon", Embedding(vocab, hidden), Block(norm, attention, norm if two_norms else None, mlp,
                                                             parallel=parallel),
                   config.positive("num_hidden_layers", "n_layer"), norm,
                   read_head(config, task, vocab_size=vocab, tie_default=True),
                   config.positive("max_position_embeddings", default=2048))


FAMILY = Family("falcon", ("falcon",), to_ir, MODULE_NAMES,
                head_names={**DEFAULT_HEAD_NAMES, "token-classification": "classifier"},
                base_prefixes=("transformer.",))


@hookimpl
def polylm_families() -> list[Family]:
    return [FAMILY]
