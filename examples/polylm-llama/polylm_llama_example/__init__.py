"""Llama and Qwen2 for polylm: a family plugin is a config → IR mapping and a tensor-name table, nothing else.

polylm has built-in llama and qwen2 families too; a plugin from another distribution is tried first, and a config it
declines goes on to the built-in (`polylm plugins` lists both and the conflict)."""

from polylm.config import ConfigView
from polylm.errors import Declined
from polylm.family import LLAMA_MODULE_NAMES, Family, llama_like
from polylm.hookspecs import hookimpl
from polylm.ir import ModelIR


def llama_to_ir(config: ConfigView, task: str) -> ModelIR:
    """transformers' LlamaConfig → IR (rope scaling incl. llama3 comes from polylm.config.read_rope)."""
    return llama_like(config, task, family="llama")


def qwen2_to_ir(config: ConfigView, task: str) -> ModelIR:
    """Qwen2: Llama with biases on q/k/v (not on the output projection)."""
    if config.get("use_sliding_window", kind=bool, default=False):
        raise Declined("use_sliding_window=true is not supported by polylm-llama")
    return llama_like(config, task, family="qwen2", qkv_bias=True, out_bias=False)


LLAMA = Family("llama", ("llama",), llama_to_ir, LLAMA_MODULE_NAMES, base_prefixes=("model.", "transformer."))
QWEN2 = Family("qwen2", ("qwen2",), qwen2_to_ir, LLAMA_MODULE_NAMES, base_prefixes=("model.", "transformer."))


@hookimpl
def polylm_families() -> list[Family]:
    return [LLAMA, QWEN2]
