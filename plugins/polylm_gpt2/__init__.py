"""OpenAI's GPT-2: learned absolute positions, LayerNorms with bias, Conv1D projections stored [in, out] with
q|k|v stacked in one `c_attn`, a GELU (tanh) MLP and a head tied to the token embedding."""

from dataclasses import replace

from polylm.config import ConfigView, read_activation, read_head
from polylm.errors import Declined
from polylm.family import DEFAULT_HEAD_NAMES, Family, Stored
from polylm.hookspecs import hookimpl
from polylm.ir import MLP, Attention, Block, Embedding, LearnedPositions, ModelIR, Norm

QKV = ("layers.{i}.attn.q", "layers.{i}.attn.k", "layers.{i}.attn.v")
C_ATTN = Stored("h.{i}.attn.c_attn", stacked=QKV, transposed=True)
MODULE_NAMES = {
    "embed": "wte",
    "embed.positions": "wpe",
    "layers.{i}.attn_norm": "h.{i}.ln_1",
    **{name: C_ATTN for name in QKV},
    "layers.{i}.attn.o": Stored("h.{i}.attn.c_proj", transposed=True),
    "layers.{i}.mlp_norm": "h.{i}.ln_2",
    "layers.{i}.mlp.up": Stored("h.{i}.mlp.c_fc", transposed=True),
    "layers.{i}.mlp.down": Stored("h.{i}.mlp.c_proj", transposed=True),
    "final_norm": "ln_f",
}


def to_ir(config: ConfigView, task: str) -> ModelIR:
    for key in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if config.get(key, kind=bool, default=False):
            raise Declined(f"{key} = true is not supported")
    hidden = config.positive("n_embd")
    vocab = config.positive("vocab_size")
    heads = config.positive("n_head")
    if hidden % heads:
        raise Declined(f"n_embd ({hidden}) is not divisible by n_head ({heads})")
    positions = config.positive("n_positions", default=1024)
    norm = Norm("layer", config.get("layer_norm_epsilon", kind=float, default=1e-5), bias=True)
    scale = None if config.get("scale_attn_weights", kind=bool, default=True) else 1.0
    attention = Attention(heads, heads, hidden // heads, None, qkv_bias=True, out_bias=True, scale=scale)
    mlp = MLP(config.positive("n_inner", default=4 * hidden),
              read_activation(config, "activation_function", default="gelu_new"), gated=False, bias=True)
    head = read_head(config, task, vocab_size=vocab, tie_default=True)
    if task == "token-classification":  # GPT2ForTokenClassification's classifier always has a bias
        head = replace(head, bias=True)
    return ModelIR("gpt2", Embedding(vocab, hidden, positions=LearnedPositions(positions)),
                   Block(norm, attention, norm, mlp), config.positive("n_layer"), norm, head, positions)


FAMILY = Family("gpt2", ("gpt2",), to_ir, MODULE_NAMES,
                head_names={**DEFAULT_HEAD_NAMES, "token-classification": "classifier"},
                base_prefixes=("transformer.",), ignored_tensors=(r"\.attn\.(masked_)?bias$",))


@hookimpl
def polylm_families() -> list[Family]:
    return [FAMILY]
