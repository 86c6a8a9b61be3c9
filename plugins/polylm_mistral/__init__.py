"""Mistral AI's Mistral: Llama with a sliding window on every layer (`sliding_window`; null: none), run over its
full context with ring-buffer caches."""

from polylm.config import ConfigView
from polylm.family import LLAMA_MODULE_NAMES, Family, llama_like, sliding_window
from polylm.hookspecs import hookimpl
from polylm.ir import ModelIR


def to_ir(config: ConfigView, task: str) -> ModelIR:
    return sliding_window(llama_like(config, task, family="mistral", qkv_bias=False, out_bias=False, mlp_bias=False,
                                     context_default=131072), config)


FAMILY = Family("mistral", ("mistral",), to_ir, LLAMA_MODULE_NAMES)


@hookimpl
def polylm_families() -> list[Family]:
    return [FAMILY]
