"""`CpuOps`: the reference ops with the compiled CPU kernels of `cpu_gemv` (fused residual add + RMSNorm, gated
activation, RoPE + cache write, decode attention, a token's mixture-of-experts layer in one call) where they apply,
and routed experts with less host work for one token otherwise (decode; the reference op's roundings). The kernels' ISA is picked once, when the ops are made
(`cpu_gemv.fused_kernels`); each kernel declines (returns None) where it does not apply — another device or dtype,
no extension, `POLYLM_GEMV_ISA=none` — and the reference op runs instead."""

from __future__ import annotations

import torch

from polylm.backend import ExpertParams
from polylm.ir import MLP, Attention, MoE
from polylm_torch_common.ops import ReferenceOps, StepTensors
from polylm_torch_common.params import NormParams

from . import cpu_gemv

# Query rows up to which the compiled CPU attention runs (decode); longer steps use torch's flash attention,
# which skips masked blocks.
_COMPILED_ATTENTION_MAX_NEW = 16


class CpuOps(ReferenceOps):
    """The torch backend's ops: the compiled kernels first, the reference ops where they decline."""

    def __init__(self) -> None:
        self._kernels = cpu_gemv.fused_kernels()
        self._routed: dict[int, tuple[ExpertParams, object | None]] = {}  # by id(ExpertParams): its compiled layer

    def add_norm(self, x: torch.Tensor, delta: torch.Tensor | None, p: NormParams) -> tuple[torch.Tensor, torch.Tensor]:
        if p.spec.kind == "rms":
            fused = self._kernels.add_rms_norm(x, delta, p.weight, p.bias, p.spec.eps)
            if fused is not None:
                return fused
        return super().add_norm(x, delta, p)

    def rope_and_cache(self, qkv: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                       rotary: tuple[torch.Tensor, torch.Tensor] | None, step: StepTensors,
                       attn: Attention) -> torch.Tensor:
        if step.ring_slots is not None:  # the kernel writes consecutive slots; a ring's are scattered
            return super().rope_and_cache(qkv, keys, values, rotary, step, attn)
        interleaved = rotary is not None and attn.position.interleaved
        fused = self._kernels.rope_and_cache(qkv, rotary, keys, values, step.past, attn.num_heads,
                                             attn.num_kv_heads, attn.head_dim, attn.rotary_dim, interleaved)
        return fused if fused is not None else super().rope_and_cache(qkv, keys, values, rotary, step, attn)

    def attention(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, step: StepTensors,
                  attn: Attention, sinks: torch.Tensor | None = None) -> torch.Tensor:
        if q.shape[2] <= _COMPILED_ATTENTION_MAX_NEW and sinks is None:  # the kernel has no sinks
            fused = self._kernels.attention(q, keys, values, step.attention_bias, step.key_slots,
                                            attn.softmax_scale, attn.softcap)
            if fused is not None:
                return fused
        return super().attention(q, keys, values, step, attn, sinks)

    def activation(self, h: torch.Tensor, mlp: MLP) -> torch.Tensor:
        fused = self._kernels.gated_activation(h, mlp.activation) if mlp.gated else None  # None for swiglu_oai
        return fused if fused is not None else super().activation(h, mlp)

    def routed(self, x: torch.Tensor, p: ExpertParams, moe: MoE) -> torch.Tensor:
        """One token (decode) through the compiled layer of `p` (`FusedKernels.routed_experts`: router, routing,
        the chosen experts, in one call), made on first use; the reference op elsewhere."""
        if x.shape[0] == 1 and self._kernels._applies(x):
            held = self._routed.get(id(p))
            if held is None:  # `p` is held alongside its layer, so its id stays its own
                held = self._routed[id(p)] = (p, self._kernels.routed_experts(
                    p.router, p.router_bias, p.experts_up, p.experts_down, moe) if self._plain(p) else None)
            if held[1] is not None:
                return held[1](x)
        return super().routed(x, p, moe)

    @staticmethod
    def _plain(p: ExpertParams) -> bool:
        """Whether every expert's biases are held by its layers (the compiled call adds none itself)."""
        return all(bias is None for bias in (*p.experts_up_bias, *p.experts_down_bias))

    def routed_experts(self, x: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor, p: ExpertParams,
                       moe: MoE) -> torch.Tensor:
        """The reference op with less host work for one token: without a zeroed output or row indexing, the
        weighting in place; the first chosen expert's weighted output starts the sum (0 + y is y) and the rest
        are added in place, in the experts' order, so every rounding is the reference op's."""
        if x.shape[0] != 1:
            return super().routed_experts(x, weights, chosen, p, moe)
        out = None
        for expert, slot in sorted((expert, slot) for slot, expert in enumerate(chosen[0].tolist())):
            y = self.mlp(x, p.experts_up[expert], p.experts_up_bias[expert], p.experts_down[expert],
                         p.experts_down_bias[expert], moe.expert)
            y = y.mul_(weights[:, slot, None])  # fresh; computed in float32, rounded to x's dtype once, as `.to`
            out = y if out is None else out.add_(y)
        return out
