"""Alibaba's Qwen3: Llama with an RMSNorm over each query and key head (one weight shared by the heads), head_dim
128 unless given; sliding windows as Qwen2's."""

from dataclasses import replace

from polylm.config import ConfigView
from polylm.family import LLAMA_MODULE_NAMES, Family, llama_like
from polylm.hookspecs import hookimpl
from polylm.ir import ModelIR, QKNorm
from polylm_qwen2 import qwen_windows


def to_ir(config: ConfigView, task: str) -> ModelIR:
    with_head_dim = ConfigView({"head_dim": 128, **config.data}, config.path)  # Qwen3Config's default
    ir = llama_like(with_head_dim, task, family="qwen3", mlp_bias=False)
    attention = replace(ir.attention, qk_norm=QKNorm(ir.final_norm, "head"))
    return qwen_windows(replace(ir, block=replace(ir.block, attention=attention)), config)


MODULE_NAMES = {**LLAMA_MODULE_NAMES, "layers.{i}.attn.q_norm": "layers.{i}.self_attn.q_norm",
                "layers.{i}.attn.k_norm": "layers.{i}.self_attn.k_norm"}
FAMILY = Family("qwen3", ("qwen3",), to_ir, MODULE_NAMES, base_prefixes=("model.", "transformer."))


@hookimpl
def polylm_families() -> list[Family]:
    return [FAMILY]
