"""Cohere's Command-R: parallel attention and MLP reading one shared bias-free LayerNorm, RoPE over interleaved
pairs, optional LayerNorms over each query and key head (use_qk_norm), LM logits × logit_scale, tied
embeddings by default."""

from dataclasses import replace

from polylm.config import ConfigView
from polylm.family import LLAMA_MODULE_NAMES, Family, llama_like
from polylm.hookspecs import hookimpl
from polylm.ir import ModelIR, Norm, QKNorm


def to_ir(config: ConfigView, task: str) -> ModelIR:
    ir = llama_like(config, task, family="cohere", norm=Norm("layer", 1e-5), eps_keys=("layer_norm_eps",),
                    default_theta=500000.0, interleaved=True, mlp_bias=False, tie_default=True,
                    context_default=8192)
    attention = ir.attention
    if config.get("use_qk_norm", kind=bool, default=False):
        attention = replace(attention, qk_norm=QKNorm(ir.final_norm, "head_each"))
    head = ir.head
    if task == "causal-lm":  # only CohereForCausalLM scales, and only its vocabulary logits
        head = replace(head, logit_scale=config.get("logit_scale", kind=float, default=0.0625))
    return replace(ir, head=head, block=replace(ir.block, parallel=True, mlp_norm=None, attention=attention))


MODULE_NAMES = {**{k: v for k, v in LLAMA_MODULE_NAMES.items() if k != "layers.{i}.mlp_norm"},
                "layers.{i}.attn.q_norm": "layers.{i}.self_attn.q_norm",
                "layers.{i}.attn.k_norm": "layers.{i}.self_attn.k_norm"}
# transformers has only CohereForCausalLM; QA reads `qa_outputs` over the base model
FAMILY = Family("cohere", ("cohere",), to_ir, MODULE_NAMES,
                head_names={"causal-lm": "lm_head", "question-answering": "qa_outputs"})


@hookimpl
def polylm_families() -> list[Family]:
    return [FAMILY]
