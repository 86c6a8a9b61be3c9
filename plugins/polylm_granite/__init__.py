"""IBM's Granite: Llama with four multipliers — embeddings (embedding_multiplier), the softmax scale
(attention_multiplier, replacing 1/√head_dim), each branch before the residual add (residual_multiplier) and
the LM logits, divided by logits_scaling."""

from dataclasses import replace

from polylm.config import ConfigView
from polylm.family import LLAMA_MODULE_NAMES, Family, llama_like
from polylm.hookspecs import hookimpl
from polylm.ir import ModelIR


def to_ir(config: ConfigView, task: str) -> ModelIR:
    ir = llama_like(config, task, family="granite")
    head = ir.head
    if task == "causal-lm":  # only GraniteForCausalLM divides, and only its vocabulary logits
        head = replace(head, logit_scale=1.0 / config.get("logits_scaling", kind=float, default=1.0))
    return replace(
        ir, head=head,
        embedding=replace(ir.embedding, scale=config.get("embedding_multiplier", kind=float, default=1.0)),
        block=replace(ir.block, residual_scale=config.get("residual_multiplier", kind=float, default=1.0),
                      attention=replace(ir.attention,
                                        scale=config.get("attention_multiplier", kind=float, default=1.0))))


# transformers has only GraniteForCausalLM; QA reads `qa_outputs` over the base model
FAMILY = Family("granite", ("granite",), to_ir, LLAMA_MODULE_NAMES,
                head_names={"causal-lm": "lm_head", "question-answering": "qa_outputs"})


@hookimpl
def polylm_families() -> list[Family]:
    return [FAMILY]
