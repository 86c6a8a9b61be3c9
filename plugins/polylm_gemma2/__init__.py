"""Google's Gemma 2: Gemma's (1 + w) RMSNorms, √hidden-scaled embeddings and tanh-GELU gated MLP, plus sandwich
norms (before and after each branch), a softmax scale of query_pre_attn_scalar^-½, softcapped attention and LM
logits, and local (sliding-window) layers alternating with global ones (layer_types)."""

from dataclasses import replace

from polylm.config import ConfigView, read_activation
from polylm.errors import Declined
from polylm.family import LLAMA_MODULE_NAMES, Family, llama_like, sliding_window
from polylm.hookspecs import hookimpl
from polylm.ir import ModelIR, Norm


def to_ir(config: ConfigView, task: str) -> ModelIR:
    # Gemma2Config's defaults where a key is absent; null (no cap, no window) stays null
    config = ConfigView({"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0, "sliding_window": 4096,
                         **config.data}, config.path)
    ir = gemma_sandwich(config, task, family="gemma2", context_default=8192)
    return sliding_window(ir, config, default=lambda i: i % 2 == 0)


def gemma_sandwich(config: ConfigView, task: str, *, family: str, **llama: object) -> ModelIR:
    """What Gemma 2 and 3 share: `llama_like` with Gemma's norm, activation and tied head (`llama` adds keywords),
    embeddings × √hidden, norms before and after each branch, a softmax scale of query_pre_attn_scalar^-½ (256),
    the attention softcap and, on a causal LM, the final one."""
    if config.get("use_bidirectional_attention", kind=bool, default=False):
        raise Declined("use_bidirectional_attention=true: polylm runs causal decoders only")
    ir = llama_like(config, task, family=family, norm=Norm("rms", 1e-6, weight_offset=1.0), mlp_bias=False,
                    activation=lambda c: read_activation(c, "hidden_activation", default="gelu_pytorch_tanh"),
                    tie_default=True, **llama)
    attention = replace(ir.attention, scale=config.get("query_pre_attn_scalar", kind=float, default=256.0) ** -0.5,
                        softcap=config.get("attn_logit_softcapping", kind=float, default=None))
    block = replace(ir.block, attention=attention, attn_post_norm=ir.final_norm, mlp_post_norm=ir.final_norm)
    head = ir.head
    if task == "causal-lm":  # only the causal LM caps, and only its vocabulary logits
        head = replace(head, softcap=config.get("final_logit_softcapping", kind=float, default=None))
    return replace(ir, block=block, head=head, embedding=replace(ir.embedding, scale=ir.hidden_size ** 0.5))


MODULE_NAMES = {**LLAMA_MODULE_NAMES, "layers.{i}.attn_post_norm": "layers.{i}.post_attention_layernorm",
                "layers.{i}.mlp_norm": "layers.{i}.pre_feedforward_layernorm",
                "layers.{i}.mlp_post_norm": "layers.{i}.post_feedforward_layernorm"}
# transformers has no question-answering class for Gemma 2; QA reads `qa_outputs` over the base model
FAMILY = Family("gemma2", ("gemma2",), to_ir, MODULE_NAMES)


@hookimpl
def polylm_families() -> list[Family]:
    return [FAMILY]
