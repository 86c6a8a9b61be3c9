"""BigCode's StarCoder2: LayerNorms with bias, biases on every projection (`use_bias`), a GELU (tanh) MLP without
gate, a head tied to the embedding by default, and a sliding window on every layer (`sliding_window`)."""

from polylm.config import ConfigView
from polylm.family import LLAMA_MODULE_NAMES, Family, llama_like, sliding_window
from polylm.hookspecs import hookimpl
from polylm.ir import ModelIR, Norm


def to_ir(config: ConfigView, task: str) -> ModelIR:
    bias = config.get("use_bias", kind=bool, default=True)
    ir = llama_like(config, task, family="starcoder2", norm=Norm("layer", 1e-5, bias=True), eps_keys=("norm_epsilon",),
                    qkv_bias=bias, out_bias=bias, activation="gelu_pytorch_tanh", gated=False, mlp_bias=bias,
                    tie_default=True, context_default=4096)
    return sliding_window(ir, config)


MODULE_NAMES = {**LLAMA_MODULE_NAMES, "layers.{i}.mlp.up": "layers.{i}.mlp.c_fc",
                "layers.{i}.mlp.down": "layers.{i}.mlp.c_proj"}
FAMILY = Family("starcoder2", ("starcoder2",), to_ir, MODULE_NAMES)


@hookimpl
def polylm_families() -> list[Family]:
    return [FAMILY]
