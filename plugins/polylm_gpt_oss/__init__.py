"""OpenAI's gpt-oss (bf16/fp32, as transformers saves it): attention with sinks and q/k/v/o biases, sliding-window
attention on every other layer (`layer_types`), YaRN RoPE, and routed experts (`num_local_experts`, top
`num_experts_per_tok` logits then their softmax, a router bias) of clamped SwiGLU (`swiglu_limit`, `swiglu_alpha`)
stored as stacks over the experts, [in, out], with gate and up interleaved in one `gate_up_proj`."""

from dataclasses import replace

from polylm.config import ConfigView
from polylm.family import LLAMA_MODULE_NAMES, Family, Stored, llama_like, sliding_window
from polylm.hookspecs import hookimpl
from polylm.ir import MLP, ModelIR, MoE, Norm


def to_ir(config: ConfigView, task: str) -> ModelIR:
    bias = config.get("attention_bias", kind=bool, default=True)
    ir = llama_like(config, task, family="gpt_oss", norm=Norm("rms", 1e-5), default_theta=150000.0,
                    qkv_bias=bias, out_bias=bias, context_default=131072)
    expert = MLP(ir.block.mlp.intermediate_size, "swiglu_oai", gated=True, bias=True,
                 limit=config.get("swiglu_limit", kind=float, default=7.0),
                 alpha=config.get("swiglu_alpha", kind=float, default=1.702))
    moe = MoE(config.positive("num_local_experts", default=128), config.positive("num_experts_per_tok", default=4),
              expert, routing="topk_softmax", router_bias=True)
    block = replace(ir.block, attention=replace(ir.attention, sinks=True), mlp=moe)
    return sliding_window(replace(ir, block=block), config, default=lambda i: i % 2 == 0)


EXPERTS = "layers.{i}.mlp.experts"
GATE_UP = Stored(f"{EXPERTS}.gate_up_proj", stacked=(f"{EXPERTS}.gate", f"{EXPERTS}.up"), interleaved=True,
                 transposed=True, bare=True)
MODULE_NAMES = {**LLAMA_MODULE_NAMES, "layers.{i}.attn.sinks": Stored("layers.{i}.self_attn.sinks", bare=True),
                "layers.{i}.mlp.router": "layers.{i}.mlp.router",
                f"{EXPERTS}.gate": GATE_UP, f"{EXPERTS}.up": GATE_UP,
                f"{EXPERTS}.down": Stored(f"{EXPERTS}.down_proj", transposed=True, bare=True)}
FAMILY = Family("gpt_oss", ("gpt_oss",), to_ir, MODULE_NAMES)


@hookimpl
def polylm_families() -> list[Family]:
    return [FAMILY]
