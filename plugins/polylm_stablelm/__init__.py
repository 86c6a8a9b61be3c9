"""Stability AI's StableLM (3B-4E1T, 2): Llama with LayerNorms (with bias), RoPE over a quarter of each head,
optional q/k/v biases and an optional parallel block whose MLP reads the attention's normed input."""

from dataclasses import replace

from polylm.config import ConfigView
from polylm.errors import Declined
from polylm.family import LLAMA_MODULE_NAMES, Family, llama_like
from polylm.hookspecs import hookimpl
from polylm.ir import ModelIR, Norm


def to_ir(config: ConfigView, task: str) -> ModelIR:
    if config.get("qk_layernorm", kind=bool, default=False):
        raise Declined("qk_layernorm=true: StableLM stores each head's query/key LayerNorm as a tensor of its "
                       "own (q_layernorm.norms.{h}), which polylm cannot stack into one yet")
    ir = llama_like(config, task, family="stablelm", norm=Norm("layer", 1e-5, bias=True),
                    eps_keys=("layer_norm_eps",), default_fraction=0.25,
                    qkv_bias=config.get("use_qkv_bias", kind=bool, default=False), out_bias=False, mlp_bias=False,
                    context_default=4096)
    if config.get("use_parallel_residual", kind=bool, default=False):
        return replace(ir, block=replace(ir.block, mlp_norm=None, parallel=True))
    return ir


FAMILY = Family("stablelm", ("stablelm",), to_ir, LLAMA_MODULE_NAMES)


@hookimpl
def polylm_families() -> list[Family]:
    return [FAMILY]
