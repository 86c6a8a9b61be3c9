"""Google's Gemma: (1 + w) RMSNorm, embeddings × √hidden, tanh-GELU gated MLP, MQA, tied embeddings."""

from dataclasses import replace

from polylm.config import ConfigView, read_activation
from polylm.family import LLAMA_MODULE_NAMES, Family, llama_like
from polylm.hookspecs import hookimpl
from polylm.ir import ModelIR, Norm


def to_ir(config: ConfigView, task: str) -> ModelIR:
    ir = llama_like(config, task, family="gemma", norm=Norm("rms", 1e-6, weight_offset=1.0), activation=_activation,
                    mlp_bias=False, tie_default=True, context_default=8192)
    return replace(ir, embedding=replace(ir.embedding, scale=ir.hidden_size ** 0.5))


def _activation(config: ConfigView) -> str:
    # Official configs say hidden_act "gelu" but mean the tanh approximation, as transformers reads them;
    # an explicit legacy hidden_activation is taken at its word.
    if config.has("hidden_activation"):
        return read_activation(config, "hidden_activation", default="gelu_pytorch_tanh")
    return read_activation(config, "hidden_act", default="gelu_pytorch_tanh", legacy={"gelu": "gelu_tanh"})


FAMILY = Family("gemma", ("gemma",), to_ir, LLAMA_MODULE_NAMES)


@hookimpl
def polylm_families() -> list[Family]:
    return [FAMILY]
