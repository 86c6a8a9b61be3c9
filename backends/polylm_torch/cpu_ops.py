"""`CpuOps`: the reference ops with the compiled CPU kernels of `cpu_gemv` (fused residual add + RMSNorm, gated
activation, RoPE + cache write, decode attention, a token's mixture-of-experts layer in one call, and a decode step's
whole block chained in C++) where they apply, and routed experts with less host work for one token otherwise (decode;
the reference op's roundings). The kernels' ISA is picked once, when the ops are made (`cpu_gemv.fused_kernels`);
each kernel declines (returns None) where it does not apply — another device or dtype, no extension,
`POLYLM_GEMV_ISA=none` — and the reference op runs instead."""

from __future__ import annotations

from collections.abc import Callable

import torch

from polylm.backend import ExpertParams, LayerParams
from polylm.ir import MLP, Attention, Block, MoE
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
        # the compiled layers made on first use, by id() of the params they were made from (held alongside, so
        # that the id stays theirs): ExpertParams -> `routed_experts`, LayerParams -> `decode_block`; None: none
        self._compiled: dict[int, tuple[object, object | None]] = {}

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

    def block(self, x: torch.Tensor, delta: torch.Tensor | None, block: Block, layer: LayerParams,
              keys: torch.Tensor, values: torch.Tensor, step: StepTensors,
              rotary: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A decode step's block in one compiled call (`FusedKernels.decode_block`: the ops below, chained in C++)
        where every op of the block would take its kernel: RMSNorms, no qk-norm, post-norms, sinks, residual
        scale or parallel branches, kernel layers, a gated MLP or a token's routed experts without a shared expert,
        unsharded; and a step of at most 16 new tokens per row, no ring (sliding window) and no gathered rows."""
        if step.ring_slots is not None or step.computed is not None or x.shape[-2] > _COMPILED_ATTENTION_MAX_NEW:
            return None
        fused = self._held(layer, lambda: self._decode_block(block, layer))
        if fused is None or (layer.moe is not None and x.shape[0] * x.shape[1] != 1) or not self._kernels._applies(
                x, keys, values):
            return None
        cos, sin = rotary if rotary is not None else (None, None)
        return fused(x, delta, keys, values, cos, sin, step.attention_bias, step.past, step.key_slots)

    def _decode_block(self, block: Block, layer: LayerParams) -> object | None:
        """The compiled block for `block` where it qualifies (see `block`), else None."""
        attn, mlp = block.attention, block.mlp
        if (self.collectives is not None or block.parallel or block.residual_from_normed or block.residual_scale != 1.0
                or layer.attn_post_norm is not None or layer.mlp_post_norm is not None
                or any(norm is None or norm.spec.kind != "rms" for norm in (layer.attn_norm, layer.mlp_norm))
                or attn.qk_norm is not None or attn.sinks or layer.qkv_bias is not None or layer.out_bias is not None):
            return None
        if layer.moe is not None:
            experts = self._routed_layer(layer.moe, mlp) if mlp.shared is None else None
            if experts is None:
                return None
        elif not mlp.gated or layer.up_bias is not None or layer.down_bias is not None:
            return None
        else:
            experts = None
        activation = mlp.activation if experts is None else mlp.expert.activation
        return self._kernels.decode_block(layer.attn_norm, layer.qkv, layer.out, layer.mlp_norm, experts, layer.up,
                                          layer.down, activation, attn)

    def routed(self, x: torch.Tensor, p: ExpertParams, moe: MoE) -> torch.Tensor:
        """One token (decode) through the compiled layer of `p` (`FusedKernels.routed_experts`: router, routing,
        the chosen experts, in one call), made on first use; the reference op elsewhere."""
        if x.shape[0] == 1 and self._kernels._applies(x):
            layer = self._routed_layer(p, moe)
            if layer is not None:
                return layer(x)
        return super().routed(x, p, moe)

    def _routed_layer(self, p: ExpertParams, moe: MoE) -> object | None:
        """The compiled mixture-of-experts layer of `p`, or None where it does not apply."""
        return self._held(p, lambda: self._kernels.routed_experts(p.router, p.router_bias, p.experts_up,
                                                                  p.experts_down, moe) if self._plain(p) else None)

    def _held(self, params: object, make: Callable[[], object | None]) -> object | None:
        """The compiled layer made from `params` (by `make`, on first use)."""
        held = self._compiled.get(id(params))
        if held is None:
            held = self._compiled[id(params)] = (params, make())
        return held[1]

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
