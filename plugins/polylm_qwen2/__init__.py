"""Alibaba's Qwen2: Llama with biases on q, k and v (not on o); declines sliding-window attention."""

from polylm.config import ConfigView
from polylm.errors import Declined
from polylm.family import LLAMA_MODULE_NAMES, Family, llama_like
from polylm.hookspecs import hookimpl
from polylm.ir import ModelIR


def to_ir(config: ConfigView, task: str) -> ModelIR:
    ir = llama_like(config, task, family="qwen2", qkv_bias=True, out_bias=False, mlp_bias=False)
    decline_sliding_window(config, ir)
    return ir


def decline_sliding_window(config: ConfigView, ir: ModelIR) -> None:
    """Raise `Declined` when `use_sliding_window` windows some layer's attention within the context limit, as
    transformers' Qwen2/Qwen3 configs decide: the layers `layer_types` names "sliding_attention", else those
    from `max_window_layers` (default 28) on. A window as long as the context limit changes nothing."""
    if not config.get("use_sliding_window", kind=bool, default=False):
        return
    window = config.get("sliding_window", default=None if "sliding_window" in config.data else 4096)
    if config.has("layer_types"):
        windowed = "sliding_attention" in config.get("layer_types", kind=list)
    else:
        windowed = config.get("max_window_layers", default=28) < ir.num_layers
    if windowed and window is not None and window < ir.context_length:
        raise Declined(f"use_sliding_window=true windows attention to sliding_window={window} tokens, "
                       f"which polylm's IR cannot express")


FAMILY = Family("qwen2", ("qwen2",), to_ir, LLAMA_MODULE_NAMES, base_prefixes=("model.", "transformer."))


@hookimpl
def polylm_families() -> list[Family]:
    return [FAMILY]
