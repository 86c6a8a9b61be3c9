"""Mistral AI's Mixtral: Mistral with routed experts in place of the MLP (`num_local_experts`, top
`num_experts_per_tok` by softmax, renormalized), each expert stored as its own w1 (gate), w3 (up) and w2 (down)."""

from dataclasses import replace

from polylm.config import ConfigView
from polylm.family import LLAMA_MODULE_NAMES, Family, Stored, llama_like, sliding_window
from polylm.hookspecs import hookimpl
from polylm.ir import ModelIR, MoE


def to_ir(config: ConfigView, task: str) -> ModelIR:
    ir = llama_like(config, task, family="mixtral", qkv_bias=False, out_bias=False, mlp_bias=False,
                    context_default=131072)
    moe = MoE(config.positive("num_local_experts", default=8), config.positive("num_experts_per_tok", default=2),
              ir.block.mlp, normalize=True)
    return sliding_window(replace(ir, block=replace(ir.block, mlp=moe)), config)


EXPERT = "layers.{i}.block_sparse_moe.experts.{h}"
MODULE_NAMES = {**LLAMA_MODULE_NAMES, "layers.{i}.mlp.router": "layers.{i}.block_sparse_moe.gate",
                "layers.{i}.mlp.experts.gate": Stored(f"{EXPERT}.w1"),
                "layers.{i}.mlp.experts.up": Stored(f"{EXPERT}.w3"),
                "layers.{i}.mlp.experts.down": Stored(f"{EXPERT}.w2")}
FAMILY = Family("mixtral", ("mixtral",), to_ir, MODULE_NAMES)


@hookimpl
def polylm_families() -> list[Family]:
    return [FAMILY]
