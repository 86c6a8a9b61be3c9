"""NVIDIA's Nemotron: LayerNorm1P (1 + w, with bias), non-gated ReLU² MLP, RoPE over half of each head."""

from polylm.config import ConfigView
from polylm.family import LLAMA_MODULE_NAMES, Family, llama_like
from polylm.hookspecs import hookimpl
from polylm.ir import ModelIR, Norm


def to_ir(config: ConfigView, task: str) -> ModelIR:
    return llama_like(config, task, family="nemotron", norm=Norm("layer", 1e-5, weight_offset=1.0, bias=True),
                      eps_keys=("norm_eps", "layer_norm_eps"), default_fraction=0.5, activation="relu2",
                      gated=False, context_default=4096)


FAMILY = Family("nemotron", ("nemotron",), to_ir, LLAMA_MODULE_NAMES, base_prefixes=("model.", "transformer."))


@hookimpl
def polylm_families() -> list[Family]:
    return [FAMILY]
