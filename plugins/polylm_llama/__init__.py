"""Meta's Llama: the shape `llama_like` describes (RoPE with every scaling incl. llama3, attention_bias,
mlp_bias, head_dim, tie_word_embeddings all read there)."""

from polylm.config import ConfigView
from polylm.family import LLAMA_MODULE_NAMES, Family, llama_like
from polylm.hookspecs import hookimpl
from polylm.ir import ModelIR


def to_ir(config: ConfigView, task: str) -> ModelIR:
    return llama_like(config, task, family="llama")


# LlamaForQuestionAnswering keeps its base model under `transformer.`
FAMILY = Family("llama", ("llama",), to_ir, LLAMA_MODULE_NAMES, base_prefixes=("model.", "transformer."))


@hookimpl
def polylm_families() -> list[Family]:
    return [FAMILY]
