"""What a family plugin supplies: its model types, the config → IR mapping and the tensor-name table; and
`llama_like`, the mapping of Llama-shaped families, which a family calls with only what differs from Llama.

A mapping may decline a config variant it does not handle (raise `polylm.errors.Declined`) so that the next
family claiming the model type is tried, and may attach notes for the user (return `Mapped(ir, notes)`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Mapping

from .checkpoint.weights import ModuleName, Stored  # noqa: F401 - Stored: families import it from here
from .config import ConfigView, read_activation, read_head, read_heads, read_rope, read_sliding_layers
from .ir import MLP, Attention, Block, Embedding, ModelIR, Norm

API_VERSION = 1


class FamilyNote(UserWarning):
    """The warning category of a family's notes about how it runs a checkpoint (e.g. a feature it limits)."""


@dataclass(frozen=True)
class Mapped:
    """What `Family.to_ir` may return instead of a bare `ModelIR`: the IR and notes the user should see."""

    ir: ModelIR
    notes: tuple[str, ...] = ()

#: Head tensors as transformers' `…For<Task>` classes name them (without `.weight` / `.bias`).
DEFAULT_HEAD_NAMES: Mapping[str, str] = {
    "causal-lm": "lm_head",
    "sequence-classification": "score",
    "token-classification": "score",
    "question-answering": "qa_outputs",
}

#: The module names of transformers' Llama and most families derived from it.
LLAMA_MODULE_NAMES: Mapping[str, str] = {
    "embed": "embed_tokens",
    "layers.{i}.attn_norm": "layers.{i}.input_layernorm",
    "layers.{i}.attn.q": "layers.{i}.self_attn.q_proj",
    "layers.{i}.attn.k": "layers.{i}.self_attn.k_proj",
    "layers.{i}.attn.v": "layers.{i}.self_attn.v_proj",
    "layers.{i}.attn.o": "layers.{i}.self_attn.o_proj",
    "layers.{i}.mlp_norm": "layers.{i}.post_attention_layernorm",
    "layers.{i}.mlp.gate": "layers.{i}.mlp.gate_proj",
    "layers.{i}.mlp.up": "layers.{i}.mlp.up_proj",
    "layers.{i}.mlp.down": "layers.{i}.mlp.down_proj",
    "final_norm": "norm",
}


@dataclass(frozen=True)
class Family:
    """A model family, as a record of data and one mapping function.

    - `to_ir(config, task)` maps config.json to a `ModelIR` (`llama_like` for Llama-shaped families; else
      the readers of `polylm.config`), or to a `Mapped` carrying notes for the user; it raises
      `polylm.errors.Declined` for a variant another family claiming the model type may handle.
    - `module_names` maps canonical module names (`embed`, `layers.{i}.attn.q`, …; see
      `ModelIR.tensor_shapes`) to the checkpoint's, without the base-model prefix; `.weight` / `.bias` are
      appended to both sides. A value may be a `Stored` record instead of a name: candidate names, rows of a
      tensor stacking several canonical ones, transposed storage.
    - `head_names` maps each task to its head module in the checkpoint (top level, no prefix).
    - `base_prefixes`: the prefixes the body tensors may carry (`model.`, `transformer.`); none is also tried.
    - `ignored_tensors`: regular expressions of checkpoint tensors nobody reads (e.g. stale rotary buffers).
    """

    name: str
    model_types: tuple[str, ...]
    to_ir: Callable[[ConfigView, str], ModelIR | Mapped]
    module_names: Mapping[str, ModuleName]
    head_names: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_HEAD_NAMES))
    base_prefixes: tuple[str, ...] = ("model.",)
    ignored_tensors: tuple[str, ...] = (r"(^|\.)rotary_emb\.inv_freq$",)
    api_version: int = API_VERSION

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.head_names)

    def map(self, config: ConfigView, task: str) -> Mapped:
        """`to_ir(config, task)` as a `Mapped` (a bare IR has no notes)."""
        result = self.to_ir(config, task)
        return result if isinstance(result, Mapped) else Mapped(result)


def llama_like(config: ConfigView, task: str, *, family: str,
               norm: Norm = Norm("rms", 1e-6), eps_keys: tuple[str, ...] = ("rms_norm_eps",),
               default_theta: float = 10000.0, default_fraction: float = 1.0, interleaved: bool = False,
               qkv_bias: bool | None = None, out_bias: bool | None = None,
               activation: str | Callable[[ConfigView], str] = "silu", gated: bool = True,
               mlp_bias: bool | None = None, tie_default: bool = False, context_default: int = 2048) -> ModelIR:
    """The IR of a Llama-shaped decoder (pre-norm blocks, separate q/k/v, RoPE, one norm kind throughout).

    Every keyword's default is Llama's, so a family passes only what differs:
    - `norm`: the norm of every block and the final one; its `eps` is replaced by the first of `eps_keys`
      present in the config (so `norm.eps` is their default).
    - `default_theta`, `default_fraction`, `interleaved`: passed to `read_rope`.
    - `qkv_bias`, `out_bias`: fixed biases; None reads `attention_bias` (default false).
    - `activation`: the default of `hidden_act` (a transformers name), or a function that reads the IR
      activation from the config itself; `gated`: whether the MLP is gated.
    - `mlp_bias`: a fixed MLP bias; None reads `mlp_bias` (default false).
    - `tie_default`: the default of `tie_word_embeddings` (`read_head`).
    - `context_default`: the default of `max_position_embeddings` as the context limit (`ModelIR.max_positions`).
    The keys are read in that order, after `hidden_size`, `vocab_size` and `read_heads`' keys, and before
    `num_hidden_layers` and the head's; rarer differences are a `dataclasses.replace` of the result.
    """
    hidden = config.positive("hidden_size")
    vocab = config.positive("vocab_size")
    heads, kv_heads, head_dim = read_heads(config, hidden)
    norm = replace(norm, eps=config.get(*eps_keys, kind=float, default=norm.eps))
    if qkv_bias is None or out_bias is None:
        bias = config.get("attention_bias", kind=bool, default=False)
        qkv_bias, out_bias = bias if qkv_bias is None else qkv_bias, bias if out_bias is None else out_bias
    rope = read_rope(config, interleaved=interleaved, default_theta=default_theta, default_fraction=default_fraction)
    attention = Attention(heads, kv_heads, head_dim, rope, qkv_bias=qkv_bias, out_bias=out_bias)
    intermediate = config.positive("intermediate_size")
    if isinstance(activation, str):
        activation = read_activation(config, "hidden_act", default=activation)
    else:
        activation = activation(config)
    if mlp_bias is None:
        mlp_bias = config.get("mlp_bias", kind=bool, default=False)
    mlp = MLP(intermediate, activation, gated=gated, bias=mlp_bias)
    return ModelIR(family, Embedding(vocab, hidden), Block(norm, attention, norm, mlp),
                   config.positive("num_hidden_layers"), norm,
                   read_head(config, task, vocab_size=vocab, tie_default=tie_default),
                   config.positive("max_position_embeddings", default=context_default))


def sliding_window(ir: ModelIR, config: ConfigView, *, default: Callable[[int], bool] = lambda i: True,
                   local: Callable[[Block], Block] = lambda block: block) -> ModelIR:
    """`ir` with sliding-window attention of `sliding_window` (the config key; null: none) on the layers that
    `polylm.config.read_sliding_layers` picks (`layer_types`, else `default(i)`: every layer); `local` changes
    such a layer's block further (Gemma 3's local RoPE theta)."""
    window = config.positive("sliding_window", default=None)
    if window is None:
        return ir
    block = ir.block
    windowed = local(replace(block, attention=replace(block.attention, window=window)))
    return ir.with_layers([windowed if slides else block
                           for slides in read_sliding_layers(config, ir.num_layers, default)])
