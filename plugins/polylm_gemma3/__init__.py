"""Google's Gemma 3 (text, `gemma3_text`): Gemma's (1 + w) RMSNorms as sandwich norms around both branches,
per-head q/k RMSNorms, a softmax scale of query_pre_attn_scalar^-½, and local layers (five of six by default)
with a sliding window and their own RoPE theta."""

from dataclasses import replace

from polylm.config import ConfigView, read_activation, read_rope
from polylm.errors import Declined
from polylm.family import DEFAULT_HEAD_NAMES, LLAMA_MODULE_NAMES, Family, llama_like, sliding_window
from polylm.hookspecs import hookimpl
from polylm.ir import ModelIR, Norm, QKNorm


def to_ir(config: ConfigView, task: str) -> ModelIR:
    if config.get("use_bidirectional_attention", kind=bool, default=False):
        raise Declined("use_bidirectional_attention=true: polylm runs causal decoders")
    config = ConfigView({"head_dim": 256, "sliding_window": 4096, **config.data}, config.path)  # the defaults
    global_rope, local_rope = _rope_views(config)
    ir = llama_like(global_rope, task, family="gemma3_text", norm=Norm("rms", 1e-6, weight_offset=1.0),
                    default_theta=1_000_000.0, activation=_activation, mlp_bias=False, tie_default=True,
                    context_default=131072)
    norm = ir.final_norm
    attention = replace(ir.attention, scale=config.get("query_pre_attn_scalar", kind=float, default=256.0) ** -0.5,
                        qk_norm=QKNorm(norm, "head"), softcap=config.get("attn_logit_softcapping", kind=float,
                                                                         default=None))
    head = ir.head
    if task == "causal-lm":
        head = replace(head, softcap=config.get("final_logit_softcapping", kind=float, default=None))
    ir = replace(ir, embedding=replace(ir.embedding, scale=ir.hidden_size ** 0.5), head=head,
                 block=replace(ir.block, attention=attention, attn_post_norm=norm, mlp_post_norm=norm))
    local = read_rope(local_rope, default_theta=10_000.0)
    pattern = config.positive("sliding_window_pattern", default=6)
    return sliding_window(ir, config, default=lambda i: (i + 1) % pattern != 0,
                          local=lambda block: replace(block, attention=replace(block.attention, position=local)))


def _activation(config: ConfigView) -> str:
    return read_activation(config, "hidden_activation", default="gelu_pytorch_tanh")


def _rope_views(config: ConfigView) -> tuple[ConfigView, ConfigView]:
    """The config as `read_rope` reads the global and the local layers' RoPE: transformers 5's
    `rope_parameters` per layer type, or the legacy `rope_theta` + `rope_scaling` and `rope_local_base_freq`."""
    params = config.get("rope_parameters", kind=dict, default={})
    if "full_attention" in params or "sliding_attention" in params:
        return tuple(ConfigView({**config.data, "rope_parameters": params.get(kind) or {"rope_type": "default"}},
                                config.path) for kind in ("full_attention", "sliding_attention"))
    local = {key: value for key, value in config.data.items() if key not in ("rope_scaling", "rope_parameters")}
    local["rope_theta"] = config.get("rope_local_base_freq", kind=float, default=10_000.0)
    return config, ConfigView(local, config.path)


MODULE_NAMES = {**LLAMA_MODULE_NAMES,
                "layers.{i}.attn_post_norm": "layers.{i}.post_attention_layernorm",
                "layers.{i}.mlp_norm": "layers.{i}.pre_feedforward_layernorm",
                "layers.{i}.mlp_post_norm": "layers.{i}.post_feedforward_layernorm",
                "layers.{i}.attn.q_norm": "layers.{i}.self_attn.q_norm",
                "layers.{i}.attn.k_norm": "layers.{i}.self_attn.k_norm"}
FAMILY = Family("gemma3_text", ("gemma3_text",), to_ir, MODULE_NAMES,
                head_names={task: name for task, name in DEFAULT_HEAD_NAMES.items() if task != "token-classification"})


@hookimpl
def polylm_families() -> list[Family]:
    return [FAMILY]
