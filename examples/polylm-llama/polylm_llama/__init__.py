"""Llama and Qwen2 for polylm: a family plugin is a config → IR mapping and a tensor-name table, nothing else."""

from polylm.config import ConfigView, read_activation, read_head, read_heads, read_rope
from polylm.errors import ConfigError
from polylm.family import LLAMA_MODULE_NAMES, Family
from polylm.hookspecs import hookimpl
from polylm.ir import MLP, Attention, Block, Embedding, ModelIR, Norm


def llama_to_ir(config: ConfigView, task: str) -> ModelIR:
    """transformers' LlamaConfig → IR (rope scaling incl. llama3 comes from polylm.config.read_rope)."""
    bias = config.get("attention_bias", kind=bool, default=False)
    return _llama_like(config, task, "llama", qkv_bias=bias, out_bias=bias)


def qwen2_to_ir(config: ConfigView, task: str) -> ModelIR:
    """Qwen2: Llama with biases on q/k/v (not on the output projection)."""
    if config.get("use_sliding_window", kind=bool, default=False):
        raise ConfigError(f"{config.path}: use_sliding_window=true is not supported by polylm-llama")
    return _llama_like(config, task, "qwen2", qkv_bias=True, out_bias=False)


def _llama_like(config: ConfigView, task: str, family: str, *, qkv_bias: bool, out_bias: bool) -> ModelIR:
    hidden = config.positive("hidden_size")
    vocab = config.positive("vocab_size")
    heads, kv_heads, head_dim = read_heads(config, hidden)
    norm = Norm("rms", config.get("rms_norm_eps", kind=float, default=1e-6))
    attention = Attention(heads, kv_heads, head_dim, read_rope(config), qkv_bias=qkv_bias, out_bias=out_bias)
    mlp = MLP(config.positive("intermediate_size"), read_activation(config, "hidden_act", default="silu"),
              gated=True, bias=config.get("mlp_bias", kind=bool, default=False))
    return ModelIR(family, Embedding(vocab, hidden), Block(norm, attention, norm, mlp),
                   config.positive("num_hidden_layers"), norm,
                   read_head(config, task, vocab_size=vocab, tie_default=False),
                   config.positive("max_position_embeddings", default=2048))


LLAMA = Family("llama", ("llama",), llama_to_ir, LLAMA_MODULE_NAMES, base_prefixes=("model.", "transformer."))
QWEN2 = Family("qwen2", ("qwen2",), qwen2_to_ir, LLAMA_MODULE_NAMES, base_prefixes=("model.", "transformer."))


@hookimpl
def polylm_families() -> list[Family]:
    return [LLAMA, QWEN2]
