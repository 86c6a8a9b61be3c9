"""Kyutai's Helium: Llama-like with RMSNorm, a SiLU-gated MLP and RoPE over interleaved pairs."""

from polylm.config import ConfigView, read_activation, read_head, read_heads, read_rope
from polylm.family import LLAMA_MODULE_NAMES, Family
from polylm.hookspecs import hookimpl
from polylm.ir import MLP, Attention, Block, Embedding, ModelIR, Norm


def to_ir(config: ConfigView, task: str) -> ModelIR:
    hidden = config.positive("hidden_size")
    vocab = config.positive("vocab_size")
    heads, kv_heads, head_dim = read_heads(config, hidden)
    norm = Norm("rms", config.get("rms_norm_eps", kind=float, default=1e-8))
    bias = config.get("attention_bias", kind=bool, default=False)
    attention = Attention(heads, kv_heads, head_dim, read_rope(config, interleaved=True, default_theta=100000.0),
                          qkv_bias=bias, out_bias=bias)
    mlp = MLP(config.positive("intermediate_size"), read_activation(config, "hidden_act", default="silu"), gated=True,
              bias=config.get("mlp_bias", kind=bool, default=False))
    return ModelIR("helium", Embedding(vocab, hidden), Block(norm, attention, norm, mlp),
                   config.positive("num_hidden_layers"), norm,
                   read_head(config, task, vocab_size=vocab, tie_default=False),
                   config.positive("max_position_embeddings", default=4096))


FAMILY = Family("helium", ("helium",), to_ir, LLAMA_MODULE_NAMES)


@hookimpl
def polylm_families() -> list[Family]:
    return [FAMILY]
