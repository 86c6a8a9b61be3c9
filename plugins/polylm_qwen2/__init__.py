"""Alibaba's Qwen2: Llama with biases on q, k and v (not on o); with `use_sliding_window`, a sliding window on the
layers `layer_types` names, else on those from `max_window_layers` on (transformers' rule)."""

from collections.abc import Callable

from polylm.config import ConfigView
from polylm.family import LLAMA_MODULE_NAMES, Family, llama_like, sliding_window
from polylm.hookspecs import hookimpl
from polylm.ir import ModelIR


def to_ir(config: ConfigView, task: str) -> ModelIR:
    return qwen_windows(llama_like(config, task, family="qwen2", qkv_bias=True, out_bias=False, mlp_bias=False),
                        config)


def qwen_windows(ir: ModelIR, config: ConfigView,
                 slides: Callable[[int, int], bool] = lambda i, first: i >= first) -> ModelIR:
    """Qwen2/Qwen3's sliding windows: none unless `use_sliding_window`; `sliding_window` defaults to 4096; without
    `layer_types`, layer i slides when `slides(i, max_window_layers)` (default 28): from it on by default."""
    if not config.get("use_sliding_window", kind=bool, default=False):
        return ir
    window = config.get("sliding_window", default=None if "sliding_window" in config.data else 4096)
    first = config.get("max_window_layers", default=28)
    view = ConfigView({**config.data, "sliding_window": window}, config.path)
    return sliding_window(ir, view, default=lambda i: slides(i, first))


FAMILY = Family("qwen2", ("qwen2",), to_ir, LLAMA_MODULE_NAMES, base_prefixes=("model.", "transformer."))


@hookimpl
def polylm_families() -> list[Family]:
    return [FAMILY]
