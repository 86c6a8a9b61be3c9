"""Stability AI's StableLM (3B-4E1T, 2): Llama with LayerNorms (with bias), RoPE over a quarter of each head,
optional q/k/v biases, an optional parallel block whose MLP reads the attention's normed input, and optional
bias-free LayerNorms over each query and key head (qk_layernorm), stored as one tensor per head."""

from dataclasses import replace

from polylm.config import ConfigView
from polylm.family import LLAMA_MODULE_NAMES, Family, Stored, llama_like
from polylm.hookspecs import hookimpl
from polylm.ir import ModelIR, Norm, QKNorm


def to_ir(config: ConfigView, task: str) -> ModelIR:
    ir = llama_like(config, task, family="stablelm", norm=Norm("layer", 1e-5, bias=True),
                    eps_keys=("layer_norm_eps",), default_fraction=0.25,
                    qkv_bias=config.get("use_qkv_bias", kind=bool, default=False), out_bias=False, mlp_bias=False,
                    context_default=4096)
    block = ir.block
    if config.get("qk_layernorm", kind=bool, default=False):
        qk_norm = QKNorm(replace(ir.final_norm, bias=False), "head_each")
        block = replace(block, attention=replace(block.attention, qk_norm=qk_norm))
    if config.get("use_parallel_residual", kind=bool, default=False):
        block = replace(block, mlp_norm=None, parallel=True)
    return replace(ir, block=block)


MODULE_NAMES = {**LLAMA_MODULE_NAMES,
                "layers.{i}.attn.q_norm": Stored("layers.{i}.self_attn.q_layernorm.norms.{h}"),
                "layers.{i}.attn.k_norm": Stored("layers.{i}.self_attn.k_layernorm.norms.{h}")}
FAMILY = Family("stablelm", ("stablelm",), to_ir, MODULE_NAMES)


@hookimpl
def polylm_families() -> list[Family]:
    return [FAMILY]
