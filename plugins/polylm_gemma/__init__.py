"""Google's Gemma: (1 + w) RMSNorm, embeddings × √hidden, tanh-GELU gated MLP, MQA, tied embeddings."""

from polylm.config import ConfigView, read_activation, read_head, read_heads, read_rope
from polylm.family import LLAMA_MODULE_NAMES, Family
from polylm.hookspecs import hookimpl
from polylm.ir import MLP, Attention, Block, Embedding, ModelIR, Norm


def to_ir(config: ConfigView, task: str) -> ModelIR:
    hidden = config.positive("hidden_size")
    vocab = config.positive("vocab_size")
    heads, kv_heads, head_dim = read_heads(config, hidden)
    norm = Norm("rms", config.get("rms_norm_eps", kind=float, default=1e-6), weight_offset=1.0)
    bias = config.get("attention_bias", kind=bool, default=False)
    attention = Attention(heads, kv_heads, head_dim, read_rope(config), qkv_bias=bias, out_bias=bias)
    # Official configs say hidden_act "gelu" but mean the tanh approximation, as transformers reads them;
    # an explicit legacy hidden_activation is taken at its word.
    if config.has("hidden_activation"):
        activation = read_activation(config, "hidden_activation", default="gelu_pytorch_tanh")
    else:
        activation = read_activation(config, "hidden_act", default="gelu_pytorch_tanh", legacy={"gelu": "gelu_tanh"})
    mlp = MLP(config.positive("intermediate_size"), activation, gated=True)
    return ModelIR("gemma", Embedding(vocab, hidden, scale=hidden ** 0.5), Block(norm, attention, norm, mlp),
                   config.positive("num_hidden_layers"), norm,
                   read_head(config, task, vocab_size=vocab, tie_default=True),
                   config.positive("max_position_embeddings", default=8192))


FAMILY = Family("gemma", ("gemma",), to_ir, LLAMA_MODULE_NAMES)


@hookimpl
def polylm_families() -> list[Family]:
    return [FAMILY]
