"""Google's Gemma 2: Gemma's (1 + w) RMSNorms, √hidden-scaled embeddings and tanh-GELU gated MLP, plus sandwich
norms (before and after each branch), a softmax scale of query_pre_attn_scalar^-½, softcapped attention and LM
logits, and local (sliding-window) layers alternating with global ones (layer_types)."""

from dataclasses import replace

from polylm.config import ConfigView, read_activation
from polylm.errors import ConfigError, Declined
from polylm.family import LLAMA_MODULE_NAMES, Family, llama_like
from polylm.hookspecs import hookimpl
from polylm.ir import ModelIR, Norm

LAYER_TYPES = ("sliding_attention", "full_attention")


def to_ir(config: ConfigView, task: str) -> ModelIR:
    if config.get("use_bidirectional_attention", kind=bool, default=False):
        raise Declined("use_bidirectional_attention=true: polylm runs causal decoders only")
    ir = llama_like(config, task, family="gemma2", norm=Norm("rms", 1e-6, weight_offset=1.0), mlp_bias=False,
                    activation=lambda c: read_activation(c, "hidden_activation", default="gelu_pytorch_tanh"),
                    tie_default=True, context_default=8192)
    attention = replace(ir.attention, scale=config.get("query_pre_attn_scalar", kind=float, default=256.0) ** -0.5,
                        softcap=_nullable(config, "attn_logit_softcapping", 50.0))
    block = replace(ir.block, attention=attention, attn_post_norm=ir.final_norm, mlp_post_norm=ir.final_norm)
    kinds = config.get("layer_types", kind=list, default=None) or [LAYER_TYPES[i % 2] for i in range(ir.num_layers)]
    if len(kinds) != ir.num_layers or not set(kinds) <= set(LAYER_TYPES):
        raise ConfigError(f"{config.path}: layer_types must name {ir.num_layers} layers, each one of "
                          f"{', '.join(LAYER_TYPES)}; found {kinds!r}")
    window = _nullable(config, "sliding_window", 4096, kind=int)
    window = window if window is not None and window < ir.context_length else None  # else it hides no key
    if window is not None and "sliding_attention" in kinds:  # drop this check once backends honour windows
        raise Declined(f"sliding_window={window} is below the context of {ir.context_length} positions: polylm "
                       "does not run sliding-window attention yet")
    local = replace(block, attention=replace(attention, window=window))
    ir = ir.with_layers([local if kind == "sliding_attention" else block for kind in kinds])
    head = ir.head
    if task == "causal-lm":  # only Gemma2ForCausalLM caps, and only its vocabulary logits
        head = replace(head, softcap=_nullable(config, "final_logit_softcapping", 30.0))
    return replace(ir, head=head, embedding=replace(ir.embedding, scale=ir.hidden_size ** 0.5))


def _nullable(config: ConfigView, key: str, default: float, kind: type = float) -> float | None:
    """`key`'s value; None where config.json says null (no cap, no window), `default` where it says nothing."""
    return config.get(key, kind=kind, default=None) if key in config.data else default


MODULE_NAMES = {**LLAMA_MODULE_NAMES, "layers.{i}.attn_post_norm": "layers.{i}.post_attention_layernorm",
                "layers.{i}.mlp_norm": "layers.{i}.pre_feedforward_layernorm",
                "layers.{i}.mlp_post_norm": "layers.{i}.post_feedforward_layernorm"}
# transformers has no question-answering class for Gemma 2; QA reads `qa_outputs` over the base model
FAMILY = Family("gemma2", ("gemma2",), to_ir, MODULE_NAMES)


@hookimpl
def polylm_families() -> list[Family]:
    return [FAMILY]
