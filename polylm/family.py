"""What a family plugin supplies: its model types, the config → IR mapping and the tensor-name table."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

from .config import ConfigView
from .ir import ModelIR

API_VERSION = 1

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

    - `to_ir(config, task)` maps config.json to a `ModelIR` (use `polylm.config.read_rope` / `read_head`).
    - `module_names` maps canonical module names (`embed`, `layers.{i}.attn.q`, …; see
      `ModelIR.tensor_shapes`) to the checkpoint's, without the base-model prefix; `.weight` / `.bias` are
      appended to both sides.
    - `head_names` maps each task to its head module in the checkpoint (top level, no prefix).
    - `base_prefixes`: the prefixes the body tensors may carry (`model.`, `transformer.`); none is also tried.
    - `ignored_tensors`: regular expressions of checkpoint tensors nobody reads (e.g. stale rotary buffers).
    """

    name: str
    model_types: tuple[str, ...]
    to_ir: Callable[[ConfigView, str], ModelIR]
    module_names: Mapping[str, str]
    head_names: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_HEAD_NAMES))
    base_prefixes: tuple[str, ...] = ("model.",)
    ignored_tensors: tuple[str, ...] = (r"(^|\.)rotary_emb\.inv_freq$",)
    api_version: int = API_VERSION

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.head_names)
