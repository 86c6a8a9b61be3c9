"""Alibaba's Qwen3-MoE: Qwen3's RMSNorm over each query and key head with routed experts of
`moe_intermediate_size` (softmax → top `num_experts_per_tok`, renormalized when `norm_topk_prob`), no shared expert;
dense layers as Qwen2-MoE's (`mlp_only_layers`, `decoder_sparse_step`); with `use_sliding_window`, a window on
every layer."""

from dataclasses import replace

from polylm.config import ConfigView
from polylm.family import Family, llama_like
from polylm.hookspecs import hookimpl
from polylm.ir import ModelIR, MoE, QKNorm
from polylm_qwen2 import qwen_windows
from polylm_qwen2_moe import EXPERT_NAMES, sparse_layers
from polylm_qwen3 import MODULE_NAMES as QWEN3_NAMES


def to_ir(config: ConfigView, task: str) -> ModelIR:
    ir = llama_like(config, task, family="qwen3_moe", mlp_bias=False)
    ir = replace(ir, block=replace(ir.block, attention=replace(ir.attention, qk_norm=QKNorm(ir.final_norm, "head"))))

    def moe(num_experts: int) -> MoE:
        return MoE(num_experts, config.positive("num_experts_per_tok", default=8),
                   replace(ir.block.mlp, intermediate_size=config.positive("moe_intermediate_size", default=768)),
                   normalize=config.get("norm_topk_prob", kind=bool, default=False))
    return qwen_windows(sparse_layers(ir, config, moe, default_experts=128), config, slides=lambda i, first: True)


FAMILY = Family("qwen3_moe", ("qwen3_moe",), to_ir, {**QWEN3_NAMES, **EXPERT_NAMES})


@hookimpl
def polylm_families() -> list[Family]:
    return [FAMILY]
