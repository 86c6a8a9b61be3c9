"""AI2's OLMoE: Llama with RMSNorms over the whole query and key projections (as OLMo-2's) and routed experts
in place of every MLP (softmax → top `num_experts_per_tok`, renormalized when `norm_topk_prob`). Declines
`clip_qkv`, which the IR cannot say."""

from dataclasses import replace

from polylm.config import ConfigView
from polylm.errors import Declined
from polylm.family import LLAMA_MODULE_NAMES, Family, llama_like
from polylm.hookspecs import hookimpl
from polylm.ir import ModelIR, MoE, Norm, QKNorm
from polylm_qwen2_moe import EXPERT_NAMES


def to_ir(config: ConfigView, task: str) -> ModelIR:
    if (clip := config.get("clip_qkv", kind=float, default=None)) is not None:
        raise Declined(f"clip_qkv={clip} clamps q, k and v, which polylm's IR cannot say")
    ir = llama_like(config, task, family="olmoe", norm=Norm("rms", 1e-5), mlp_bias=False, context_default=4096)
    moe = MoE(config.positive("num_experts", "num_local_experts", default=64),
              config.positive("num_experts_per_tok", default=8), ir.block.mlp,
              normalize=config.get("norm_topk_prob", kind=bool, default=False))
    attention = replace(ir.attention, qk_norm=QKNorm(ir.final_norm, "projection"))
    return replace(ir, block=replace(ir.block, attention=attention, mlp=moe))


MODULE_NAMES = {**LLAMA_MODULE_NAMES, **EXPERT_NAMES,
                **{f"layers.{{i}}.attn.{n}": f"layers.{{i}}.self_attn.{n}" for n in ("q_norm", "k_norm")}}
# transformers has only OlmoeForCausalLM; QA reads `qa_outputs` over the base model
FAMILY = Family("olmoe", ("olmoe",), to_ir, MODULE_NAMES,
                head_names={"causal-lm": "lm_head", "question-answering": "qa_outputs"})


@hookimpl
def polylm_families() -> list[Family]:
    return [FAMILY]
