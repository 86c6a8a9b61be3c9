"""`TritonOps`: the reference ops (`polylm_torch_common.ops`) replaced by the Triton kernels of this package.

Matrix multiplies stay torch (cuBLAS), except those of weight-only quantized weights (`quantized`) and of
routed experts (`experts`). Every op reads only tensors of the step — never `StepTensors.past` — launches with
shapes fixed by the step's tensor sizes, and never synchronizes with the host, so a CUDA graph can capture a
whole decode step (see `graph.DecodeGraph`).
"""

from __future__ import annotations

import torch

from polylm.backend import ExpertParams
from polylm.ir import MLP, Attention, MoE
from polylm_torch_common.ops import ReferenceOps, StepTensors
from polylm_torch_common.params import NormParams

from . import activation, attention, experts, gather, quantized, rope
from . import norm as norms


class TritonOps(ReferenceOps):
    """Fused Triton kernels for norms (with the residual add), the embedding, RoPE with the cache write, the
    MLP activation with its gate, attention (prefill and split-KV decode), the head's row gather, the matmul of
    weight-only quantized weights, and the routed experts' grouped matmul (over the stacks `experts.stack_params`
    makes)."""

    graph_safe = True
    reads_bias = False  # the attention kernel applies the visibility rule itself (tested equal to core's)

    def linear(self, x: torch.Tensor, weight: torch.Tensor | quantized.QuantizedWeight,
               bias: torch.Tensor | None = None) -> torch.Tensor:
        if isinstance(weight, quantized.QuantizedWeight):
            return quantized.linear(x, weight, bias)
        return super().linear(x, weight, bias)

    def norm(self, x: torch.Tensor, p: NormParams) -> torch.Tensor:
        if p.weight.dim() > 1:  # a weight row per head (`QKNorm` "head_each"): the reference op
            return super().norm(x, p)
        return norms.add_norm(x, None, p)[1]

    def add_norm(self, x: torch.Tensor, delta: torch.Tensor | None, p: NormParams) -> tuple[torch.Tensor, torch.Tensor]:
        return norms.add_norm(x, delta, p)

    def embed(self, ids: torch.Tensor, table: torch.Tensor | quantized.QuantizedWeight, scale: float,
              norm: NormParams | None) -> torch.Tensor:
        if isinstance(table, quantized.QuantizedWeight):  # its rows dequantized, then scaled and normed as a table
            rows = table.rows(ids.reshape(-1))
            return norms.embed(torch.arange(len(rows), device=rows.device).reshape(ids.shape), rows, scale, norm)
        return norms.embed(ids, table, scale, norm)

    def rope_and_cache(self, qkv: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                       rotary: tuple[torch.Tensor, torch.Tensor] | None, step: StepTensors,
                       attn: Attention) -> torch.Tensor:
        slots = step.slots if step.ring_slots is None else step.ring_slots  # a sliding-window layer: its ring's
        return rope.rope_and_cache(qkv, keys, values, rotary, slots, attn)

    def attention(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, step: StepTensors,
                  attn: Attention, sinks: torch.Tensor | None = None) -> torch.Tensor:
        if step.ring_slots is not None:
            return attention.attention(q, keys, values, step.ring_mask, step.ring_positions, step.slots, step.alibi,
                                       attn, query_positions=step.new_positions, sinks=sinks)
        return attention.attention(q, keys, values, step.mask, step.positions, step.slots, step.alibi, attn,
                                   sinks=sinks)

    def activation(self, h: torch.Tensor, mlp: MLP) -> torch.Tensor:
        if mlp.activation == "swiglu_oai":  # no kernel for gpt-oss's clamped SwiGLU: the reference op
            return super().activation(h, mlp)
        return activation.activation(h, mlp)

    def routed_experts(self, x: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor, p: ExpertParams,
                       moe: MoE) -> torch.Tensor:
        return experts.routed_experts(x, weights, chosen, p, moe, lambda h: self.activation(h, moe.expert))

    def gather(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return gather.gather(x, index)
