"""Microsoft's Phi-3 (3.5, Phi-4-mini): Llama-shaped without biases, q|k|v stacked in one `qkv_proj` and gate|up
in one `gate_up_proj`, LongRoPE, partial RoPE (Phi-4-mini), a sliding window on every layer."""

from polylm.config import ConfigView
from polylm.errors import Declined
from polylm.family import LLAMA_MODULE_NAMES, Family, Stored, llama_like, sliding_window
from polylm.hookspecs import hookimpl
from polylm.ir import ModelIR, Norm

QKV = ("layers.{i}.attn.q", "layers.{i}.attn.k", "layers.{i}.attn.v")
GATE_UP = ("layers.{i}.mlp.gate", "layers.{i}.mlp.up")
MODULE_NAMES = {**LLAMA_MODULE_NAMES,
                **dict.fromkeys(QKV, Stored("layers.{i}.self_attn.qkv_proj", stacked=QKV)),
                **dict.fromkeys(GATE_UP, Stored("layers.{i}.mlp.gate_up_proj", stacked=GATE_UP))}


def to_ir(config: ConfigView, task: str) -> ModelIR:
    # Phi3Config's top-level original_max_position_embeddings (default 4096) is LongRoPE's, over rope_scaling's
    config = ConfigView({"original_max_position_embeddings": 4096, **config.data}, config.path)
    if config.rope_parameters().get("rope_type", kind=str, default=None) == "yarn":
        raise Declined("rope type 'yarn': transformers reads it as longrope in a phi3 config")
    ir = llama_like(config, task, family="phi3", norm=Norm("rms", 1e-5), qkv_bias=False, out_bias=False,
                    mlp_bias=False, context_default=4096)
    return sliding_window(ir, config)


FAMILY = Family("phi3", ("phi3",), to_ir, MODULE_NAMES)


@hookimpl
def polylm_families() -> list[Family]:
    return [FAMILY]
