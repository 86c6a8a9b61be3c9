"""Google's Gemma 3 (text, `gemma3_text`): Gemma 2's sandwich blocks without default softcaps, per-head q/k
RMSNorms, and local layers (five of six by default) with a sliding window and their own RoPE theta."""

from dataclasses import replace

from polylm.config import ConfigView, read_rope
from polylm.family import DEFAULT_HEAD_NAMES, Family, sliding_window
from polylm.hookspecs import hookimpl
from polylm.ir import ModelIR, QKNorm
from polylm_gemma2 import MODULE_NAMES as GEMMA2_NAMES
from polylm_gemma2 import gemma_sandwich


def to_ir(config: ConfigView, task: str) -> ModelIR:
    config = ConfigView({"head_dim": 256, "sliding_window": 4096, **config.data}, config.path)  # the defaults
    global_rope, local_rope = _rope_views(config)
    ir = gemma_sandwich(global_rope, task, family="gemma3_text", default_theta=1_000_000.0, context_default=131072)
    ir = replace(ir, block=replace(ir.block, attention=replace(ir.attention, qk_norm=QKNorm(ir.final_norm, "head"))))
    local = read_rope(local_rope, default_theta=10_000.0)
    pattern = config.positive("sliding_window_pattern", default=6)
    return sliding_window(ir, config, default=lambda i: (i + 1) % pattern != 0,
                          local=lambda block: replace(block, attention=replace(block.attention, position=local)))


def _rope_views(config: ConfigView) -> tuple[ConfigView, ConfigView]:
    """The config as `read_rope` reads the global and the local layers' RoPE: transformers 5's
    `rope_parameters` per layer type, or the legacy `rope_theta` + `rope_scaling` and `rope_local_base_freq`."""
    params = config.get("rope_parameters", kind=dict, default={})
    if "full_attention" in params or "sliding_attention" in params:
        return tuple(ConfigView({**config.data, "rope_parameters": params.get(kind) or {"rope_type": "default"}},
                                config.path) for kind in ("full_attention", "sliding_attention"))
    local = {key: value for key, value in config.data.items() if key not in ("rope_scaling", "rope_parameters")}
    local["rope_theta"] = config.get("rope_local_base_freq", kind=float, default=10_000.0)
    return config, ConfigView(local, config.path)


MODULE_NAMES = {**GEMMA2_NAMES, "layers.{i}.attn.q_norm": "layers.{i}.self_attn.q_norm",
                "layers.{i}.attn.k_norm": "layers.{i}.self_attn.k_norm"}
FAMILY = Family("gemma3_text", ("gemma3_text",), to_ir, MODULE_NAMES,
                head_names={task: name for task, name in DEFAULT_HEAD_NAMES.items() if task != "token-classification"})


@hookimpl
def polylm_families() -> list[Family]:
    return [FAMILY]
