"""Arcee (AFM): Llama-like with a non-gated ReLU² MLP, GQA and optional YaRN rope scaling."""

from polylm.config import ConfigView
from polylm.family import LLAMA_MODULE_NAMES, Family, llama_like
from polylm.hookspecs import hookimpl
from polylm.ir import ModelIR, Norm


def to_ir(config: ConfigView, task: str) -> ModelIR:
    return llama_like(config, task, family="arcee", norm=Norm("rms", 1e-5), activation="relu2", gated=False,
                      context_default=4096)


FAMILY = Family("arcee", ("arcee",), to_ir, LLAMA_MODULE_NAMES,
                base_prefixes=("model.", "transformer."))


@hookimpl
def polylm_families() -> list[Family]:
    return [FAMILY]
