"""The decoder forward pass in torch, over a preallocated KV cache, calling primitives through an ops object."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable

import numpy as np
import torch

from polylm.backend import Cache, Pass, Reduce, Reduced, RingPass, Runtime, Step
from polylm.checkpoint.weights import Weights
from polylm.ir import ALiBi, Attention, Block, ModelIR, RoPE
from polylm.numerics.masks import attention_bias, ring_bias, ring_keys
from polylm.numerics.positions import alibi_slopes, rope_frequencies_per_row
from polylm.parallel.plan import ShardPlan

from .ops import ReferenceOps, StepTensors
from .params import TORCH_DTYPES, LayerParams, NormParams, Prepare, TensorReader, build_params
from .reduce import reduce_outputs


def to_host(out: torch.Tensor) -> np.ndarray:
    """Head outputs as `Runtime.forward` returns them: float32 on the host."""
    return out.float().cpu().numpy()


class TorchRuntime(Runtime):
    """Runs a `ModelIR` with torch tensors on one device through `ops` (the plain-torch reference by default);
    `prepare` turns each matrix into the layer computed with as the params are read (see `params.build_params`),
    else the matrices stay tensors."""

    def __init__(self, ir: ModelIR, weights: Weights, dtype: str, device: str = "cpu", ops: ReferenceOps | None = None,
                 plan: ShardPlan | None = None, prepare: Prepare | None = None) -> None:
        self.ir, self.dtype, self.device = ir, dtype, torch.device(device)
        self.torch_dtype = TORCH_DTYPES[dtype]
        self.ops = ops or ReferenceOps()
        # a tensor-parallel rank computes its own heads, MLP range and vocabulary rows (`polylm.parallel`)
        self.plan, self.local = plan, plan.local_ir if plan is not None else ir
        with TensorReader(weights, self.torch_dtype, self.device, plan) as read:
            self.params = build_params(self.local, read, prepare)
        attn = ir.attention
        heads = slice(plan.heads.start, plan.heads.stop) if plan is not None else slice(None)
        self.alibi = (torch.from_numpy(alibi_slopes(attn)[heads].copy()).to(self.device)
                      if isinstance(attn.position, ALiBi) else None)
        # the embedding scale as a value of the compute dtype (Gemma multiplies by √hidden rounded to it)
        self.embed_scale = float(torch.tensor(ir.embedding.scale, dtype=self.torch_dtype))
        # the attention of each kind of RoPE the layers use (Gemma 3's local layers have their own theta)
        self.ropes = {block.attention.position: block.attention for block in ir.blocks
                      if isinstance(block.attention.position, RoPE)}
        self._frequencies: dict[RoPE, tuple[bytes, torch.Tensor]] = {}  # the last uploads, reused while unchanged

    def new_cache(self, batch: int, capacity: int) -> Cache:
        attn = self.local.attention

        def make(slots: int) -> torch.Tensor:
            return torch.zeros((batch, attn.num_kv_heads, slots, attn.head_dim), dtype=self.torch_dtype,
                               device=self.device)

        return Cache.build(self.ir, batch, capacity, make)

    def forward(self, step: Step, cache: Cache | None = None) -> np.ndarray:
        return self.head_outputs(step, cache, to_host)

    def forward_top(self, step: Step, cache: Cache | None, reduce: Reduce) -> Reduced:
        return self.head_outputs(step, cache, lambda out: reduce_outputs(out, self.ir.head, reduce), reduce)

    @torch.inference_mode()
    def head_outputs(self, step: Step, cache: Cache | None, take: Callable[[torch.Tensor], Any],
                     reduce: Reduce | None = None) -> Any:
        """`step`'s head outputs on the device, each pass's through `take` (to the host, or `reduce`d there)."""
        cache = cache if cache is not None else self.new_cache(step.input_ids.shape[0], step.mask.shape[1])
        return cache.run(step, lambda part: take(self.run(self.upload(part), cache)), reduce)

    def upload(self, part: Pass) -> StepTensors:
        """A pass's arrays on the device, with what the ops need besides (RoPE frequencies, ALiBi slopes, core's
        attention bias when the ops read it, and each sliding-window ring's slots and bias)."""
        step, past, new = part.step, part.past, part.new
        heads = self.plan.heads if self.plan is not None else None
        bias = None
        if self.ops.reads_bias:
            bias = self._put(attention_bias(self.ir.attention, step.positions, step.mask, past, self.dtype,
                                            heads=heads)).to(self.torch_dtype)
        computed, gather = step.computed(past), step.gather
        if computed is not None and gather is not None:  # the gathered slots' places among the computed ones
            gather = np.searchsorted(computed, np.arange(len(gather)) * new + gather)
        tensors = StepTensors(
            input_ids=self._put(step.input_ids), positions=self._put(step.positions),
            new_positions=self._put(step.positions[:, past:]), mask=self._put(step.mask),
            slots=torch.arange(past, past + new, dtype=torch.int32, device=self.device),
            gather=self._put(gather) if gather is not None else None,
            frequencies={rope: self.rope_frequencies(rope, step.positions[:, past:]) for rope in self.ropes},
            alibi=self.alibi, past=past, dtype=self.torch_dtype, attention_bias=bias,
            computed=self._put(computed) if computed is not None else None)
        tensors.rings = {window: self._ring_tensors(tensors, part, ring, heads) for window, ring in part.rings.items()}
        return tensors

    def _ring_tensors(self, tensors: StepTensors, part: Pass, ring: RingPass, heads: range | None) -> StepTensors:
        """The pass's tensors as the layers of one sliding window read them (see `StepTensors.ring_slots`)."""
        step = part.step
        key_positions, real = ring_keys(step.positions, step.mask, ring)
        bias = None
        if self.ops.reads_bias:
            bias = self._put(ring_bias(self.ir.attention, step.positions, step.mask, part.past, ring, self.dtype,
                                       heads)).to(self.torch_dtype)
        return replace(tensors, ring_slots=self._put(ring.slots), ring_positions=self._put(key_positions),
                       ring_mask=self._put(real), attention_bias=bias)

    def rope_frequencies(self, rope: RoPE, positions: np.ndarray) -> tuple[torch.Tensor, float]:
        """RoPE inverse frequencies [batch or 1, rotary_dim / 2] of `rope` for query `positions`, kept on the
        device, and the cos/sin multiplier."""
        inv_freq, factor = rope_frequencies_per_row(self.ropes[rope], positions)
        key = inv_freq.tobytes() + bytes(inv_freq.shape)
        if rope not in self._frequencies or self._frequencies[rope][0] != key:  # only dynamic NTK changes them
            self._frequencies[rope] = (key, self._put(inv_freq))
        return self._frequencies[rope][1], factor

    def _put(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device)

    def run(self, step: StepTensors, cache: Cache) -> torch.Tensor:
        """The device side of a forward pass: head outputs in the compute dtype, the cache written.

        It uploads nothing and reads no host value of the step (`past`), so with ops that do neither
        (`TritonOps`) a CUDA graph can capture it and replay it on new contents of the same step tensors.
        """
        rotaries = {rope: self._rotary(step, *frequencies) for rope, frequencies in step.frequencies.items()}
        if self.plan is None:
            x = self.ops.embed(step.input_ids, self.params.embed, self.embed_scale, self.params.embed_norm)
        else:
            x = self.ops.embed_rows(step.input_ids, self.params.embed, self.plan, self.embed_scale,
                                    self.params.embed_norm)
        if self.params.positions is not None:  # learned positions (`polylm.ir.LearnedPositions`), replicated
            x = x + self.params.positions[step.new_positions]
        if step.computed is not None:
            x = x.flatten(0, 1)[step.computed]
        delta = None
        for index, (block, layer) in enumerate(zip(self.local.layers, self.params.layers)):
            window = cache.windows[index]
            x, delta = self._block(x, delta, block, layer, cache, index, step if window is None else step.rings[window],
                                   rotaries.get(block.attention.position))
        _, x = self.ops.add_norm(x, delta, self.params.final_norm)
        if step.computed is not None:  # `computed` comes with a gather
            x = x[step.gather]
        elif step.gather is not None:
            x = self.ops.gather(x, step.gather)
        out = self.ops.linear(x, self.params.head, self.params.head_bias)
        if self.plan is not None and self.plan.head_rows is not None:
            out = self.ops.gather_columns(out, self.plan.head_sizes)
        return out

    def _block(self, x: torch.Tensor, delta: torch.Tensor | None, block: Block, layer: LayerParams, cache: Cache,
               index: int, step: StepTensors, rotary: tuple[torch.Tensor, torch.Tensor] | None,
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer (see `polylm.ir.Block`) on the residual stream `x + delta`; returns the next (residual, delta)
        pair, so that each residual add happens inside the norm that follows it."""
        fused = self.ops.block(x, delta, block, layer, cache.keys[index], cache.values[index], step, rotary)
        if fused is not None:
            return fused
        x, normed = self._add_norm(x, delta, layer.attn_norm)
        attended = self._attention(normed, block.attention, layer, cache, index, step, rotary)
        attended = self._branch(attended, block, layer.attn_post_norm)
        if block.parallel:
            mlp_in = normed if layer.mlp_norm is None else self.ops.norm(x, layer.mlp_norm)
            return x, attended + self._branch(self._mlp(mlp_in, block, layer), block, layer.mlp_post_norm)
        residual = normed if block.residual_from_normed else x
        x, normed = self._add_norm(residual, attended, layer.mlp_norm)
        residual = normed if block.residual_from_normed else x
        return residual, self._branch(self._mlp(normed, block, layer), block, layer.mlp_post_norm)

    def _add_norm(self, x: torch.Tensor, delta: torch.Tensor | None, norm: NormParams | None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual sum and its norm (the sum itself where the block has no norm there)."""
        if norm is not None:
            return self.ops.add_norm(x, delta, norm)
        x = x if delta is None else x + delta
        return x, x

    def _branch(self, out: torch.Tensor, block: Block, post_norm: NormParams | None) -> torch.Tensor:
        """A branch's output as it is added to the residual stream: post-normed and scaled where the IR says."""
        if post_norm is not None:
            out = self.ops.norm(out, post_norm)
        return out if block.residual_scale == 1.0 else out * block.residual_scale

    def _mlp(self, x: torch.Tensor, block: Block, layer: LayerParams) -> torch.Tensor:
        if layer.moe is not None:
            return self.ops.reduce(self.ops.experts(x, layer.moe, block.mlp))
        return self.ops.reduce(self.ops.mlp(x, layer.up, layer.up_bias, layer.down, layer.down_bias, block.mlp))

    def _attention(self, x: torch.Tensor, attn: Attention, layer: LayerParams, cache: Cache, index: int,
                   step: StepTensors, rotary: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        keys, values = cache.keys[index], cache.values[index]
        qkv = self.ops.linear(x, layer.qkv, layer.qkv_bias)
        if attn.qk_norm is not None:
            qkv = self._qk_norm(qkv, layer, attn)
        if step.computed is not None:  # the attention ops take every new slot of every row
            spread = qkv.new_zeros((step.input_ids.numel(), qkv.shape[-1]))
            qkv = spread.index_copy_(0, step.computed, qkv).unflatten(0, step.input_ids.shape)
        q = self.ops.rope_and_cache(qkv, keys, values, rotary, step, attn)
        out = self.ops.attention(q, keys, values, step, attn, layer.sinks)
        if step.computed is not None:
            out = out.flatten(0, 1)[step.computed]
        return self.ops.reduce(self.ops.linear(out, layer.out, layer.out_bias))

    def _qk_norm(self, qkv: torch.Tensor, layer: LayerParams, attn: Attention) -> torch.Tensor:
        """The fused projection with its queries and keys normed as `attn.qk_norm` says (see `polylm.ir.QKNorm`)."""
        q_size, kv_size = attn.num_heads * attn.head_dim, attn.num_kv_heads * attn.head_dim
        q, k, v = qkv.split((q_size, kv_size, kv_size), dim=-1)
        if attn.qk_norm.scope == "projection":
            return torch.cat((self.ops.norm(q, layer.q_norm), self.ops.norm(k, layer.k_norm), v), dim=-1)
        q = self.ops.norm(q.unflatten(-1, (attn.num_heads, attn.head_dim)), layer.q_norm).flatten(-2)
        k = self.ops.norm(k.unflatten(-1, (attn.num_kv_heads, attn.head_dim)), layer.k_norm).flatten(-2)
        return torch.cat((q, k, v), dim=-1)

    @staticmethod
    def _rotary(step: StepTensors, inv_freq: torch.Tensor, factor: float) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [batch, new, rotary_dim / 2], float32, for the new tokens' positions."""
        angles = step.new_positions.float()[..., None] * inv_freq[:, None, :]
        return angles.cos() * factor, angles.sin() * factor
