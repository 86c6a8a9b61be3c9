"""Alibaba's Qwen2-MoE (Qwen1.5-MoE): Qwen2 (biases on q, k, v from `qkv_bias`) with routed experts of
`moe_intermediate_size` (softmax → top `num_experts_per_tok`, renormalized when `norm_topk_prob`) plus a shared
expert of `shared_expert_intermediate_size` scaled by sigmoid(`shared_expert_gate`); the layers in `mlp_only_layers`
or off the `decoder_sparse_step` keep a dense MLP of `intermediate_size`. Windows on the even layers below
`max_window_layers` unless `layer_types` says otherwise (transformers' rule for this model)."""

from collections.abc import Callable
from dataclasses import replace

from polylm.config import ConfigView
from polylm.family import LLAMA_MODULE_NAMES, Family, Stored, llama_like
from polylm.hookspecs import hookimpl
from polylm.ir import ModelIR, MoE
from polylm_qwen2 import qwen_windows


def to_ir(config: ConfigView, task: str) -> ModelIR:
    ir = llama_like(config, task, family="qwen2_moe", qkv_bias=config.get("qkv_bias", kind=bool, default=True),
                    out_bias=False, mlp_bias=False)
    dense = ir.block.mlp

    def moe(num_experts: int) -> MoE:
        return MoE(num_experts, config.positive("num_experts_per_tok", default=4),
                   replace(dense, intermediate_size=config.positive("moe_intermediate_size", default=1408)),
                   normalize=config.get("norm_topk_prob", kind=bool, default=False), shared_gate=True,
                   shared=replace(dense, intermediate_size=config.positive("shared_expert_intermediate_size",
                                                                            default=5632)))
    return qwen_windows(sparse_layers(ir, config, moe, default_experts=60), config,
                        slides=lambda i, first: i % 2 == 0 and i < first)


def sparse_layers(ir: ModelIR, config: ConfigView, moe: Callable[[int], MoE], default_experts: int) -> ModelIR:
    """Qwen-MoE's layers: routed experts `moe(num_experts)` on layer i unless it is in `mlp_only_layers`, when
    `num_experts` (Qwen3-MoE saves `num_local_experts`) > 0 and (i + 1) is a multiple of `decoder_sparse_step`;
    the others keep `ir`'s dense MLP."""
    num_experts = config.get("num_experts", "num_local_experts", default=default_experts)
    step = config.positive("decoder_sparse_step", default=1)
    dense_only = config.get("mlp_only_layers", kind=list, default=[])
    sparse = [num_experts > 0 and (i + 1) % step == 0 and i not in dense_only for i in range(ir.num_layers)]
    if not any(sparse):
        return ir
    routed = replace(ir.block, mlp=moe(num_experts))
    return ir.with_layers([routed if s else ir.block for s in sparse])


EXPERT = "layers.{i}.mlp.experts.{h}"
#: Routed experts one tensor per expert (as transformers 5 saves them), the router `mlp.gate`.
EXPERT_NAMES = {"layers.{i}.mlp.router": "layers.{i}.mlp.gate",
                "layers.{i}.mlp.experts.gate": Stored(f"{EXPERT}.gate_proj"),
                "layers.{i}.mlp.experts.up": Stored(f"{EXPERT}.up_proj"),
                "layers.{i}.mlp.experts.down": Stored(f"{EXPERT}.down_proj")}
MODULE_NAMES = {**LLAMA_MODULE_NAMES, **EXPERT_NAMES,
                **{f"layers.{{i}}.mlp.shared.{p}": f"layers.{{i}}.mlp.shared_expert.{p}_proj"
                   for p in ("gate", "up", "down")},
                "layers.{i}.mlp.shared_gate": "layers.{i}.mlp.shared_expert_gate"}
FAMILY = Family("qwen2_moe", ("qwen2_moe",), to_ir, MODULE_NAMES)


@hookimpl
def polylm_families() -> list[Family]:
    return [FAMILY]
