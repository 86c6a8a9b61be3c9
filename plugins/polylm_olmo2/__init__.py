"""AI2's OLMo-2: no norm before the branches, an RMSNorm after each (post-attention, post-feedforward), and
RMSNorms over the whole query and key projections."""

from dataclasses import replace

from polylm.config import ConfigView
from polylm.family import LLAMA_MODULE_NAMES, Family, llama_like
from polylm.hookspecs import hookimpl
from polylm.ir import ModelIR, Norm, QKNorm

NORM_NAMES = ("layers.{i}.attn_norm", "layers.{i}.mlp_norm")


def to_ir(config: ConfigView, task: str) -> ModelIR:
    ir = llama_like(config, task, family="olmo2", norm=Norm("rms", 1e-5), mlp_bias=False)
    norm = ir.final_norm
    attention = replace(ir.attention, qk_norm=QKNorm(norm, "projection"))
    return replace(ir, block=replace(ir.block, attn_norm=None, mlp_norm=None, attention=attention,
                                     attn_post_norm=norm, mlp_post_norm=norm))


MODULE_NAMES = {**{k: v for k, v in LLAMA_MODULE_NAMES.items() if k not in NORM_NAMES},
                "layers.{i}.attn_post_norm": "layers.{i}.post_attention_layernorm",
                "layers.{i}.mlp_post_norm": "layers.{i}.post_feedforward_layernorm",
                "layers.{i}.attn.q_norm": "layers.{i}.self_attn.q_norm",
                "layers.{i}.attn.k_norm": "layers.{i}.self_attn.k_norm"}
# transformers has no token-classification or question-answering class for OLMo-2; QA reads `qa_outputs`
FAMILY = Family("olmo2", ("olmo2",), to_ir, MODULE_NAMES,
                head_names={"causal-lm": "lm_head", "sequence-classification": "score",
                            "question-answering": "qa_outputs"})


@hookimpl
def polylm_families() -> list[Family]:
    return [FAMILY]
