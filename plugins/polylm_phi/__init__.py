"""Microsoft's Phi (1, 1.5, 2): a parallel block with one shared LayerNorm, partial RoPE, biases everywhere
(the lm_head's too, its own even when its weight is tied), a GELU MLP and optional per-head query/key LayerNorms."""

from dataclasses import replace

from polylm.config import ConfigView
from polylm.family import Family, llama_like
from polylm.hookspecs import hookimpl
from polylm.ir import ModelIR, Norm, QKNorm

MODULE_NAMES = {
    "embed": "embed_tokens",
    "layers.{i}.attn_norm": "layers.{i}.input_layernorm",
    "layers.{i}.attn.q": "layers.{i}.self_attn.q_proj",
    "layers.{i}.attn.k": "layers.{i}.self_attn.k_proj",
    "layers.{i}.attn.v": "layers.{i}.self_attn.v_proj",
    "layers.{i}.attn.q_norm": "layers.{i}.self_attn.q_layernorm",
    "layers.{i}.attn.k_norm": "layers.{i}.self_attn.k_layernorm",
    "layers.{i}.attn.o": "layers.{i}.self_attn.dense",
    "layers.{i}.mlp.up": "layers.{i}.mlp.fc1",
    "layers.{i}.mlp.down": "layers.{i}.mlp.fc2",
    "final_norm": "final_layernorm",
}


def to_ir(config: ConfigView, task: str) -> ModelIR:
    ir = llama_like(config, task, family="phi", norm=Norm("layer", 1e-5, bias=True), eps_keys=("layer_norm_eps",),
                    default_fraction=0.5, qkv_bias=True, out_bias=True, activation="gelu_new", gated=False,
                    mlp_bias=True)
    block = ir.block
    qk_norm = QKNorm(block.attn_norm, "head") if config.get("qk_layernorm", kind=bool, default=False) else None
    block = replace(block, attention=replace(block.attention, qk_norm=qk_norm), mlp_norm=None, parallel=True)
    return replace(ir, block=block, head=replace(ir.head, bias=True) if task == "causal-lm" else ir.head)


FAMILY = Family("phi", ("phi",), to_ir, MODULE_NAMES)


@hookimpl
def polylm_families() -> list[Family]:
    return [FAMILY]
