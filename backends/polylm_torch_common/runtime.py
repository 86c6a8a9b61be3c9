"""The decoder forward pass in torch, over a preallocated KV cache, calling primitives through an ops object."""

from __future__ import annotations

import numpy as np
import torch

from polylm.backend import Cache, Runtime, Step
from polylm.checkpoint.weights import Weights
from polylm.ir import ALiBi, Attention, ModelIR
from polylm.numerics.masks import attention_bias
from polylm.numerics.positions import alibi_slopes, rope_frequencies_per_row
from polylm.parallel.plan import ShardPlan

from .ops import ReferenceOps, StepTensors
from .params import TORCH_DTYPES, LayerParams, NormParams, Prepare, TensorReader, build_params


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
        self._frequencies: tuple[bytes, torch.Tensor] | None = None  # the last upload, reused while unchanged

    def new_cache(self, batch: int, capacity: int) -> Cache:
        attn = self.local.attention
        shape = (batch, attn.num_kv_heads, capacity, attn.head_dim)

        def make() -> list[torch.Tensor]:
            return [torch.zeros(shape, dtype=self.torch_dtype, device=self.device) for _ in range(self.ir.num_layers)]

        return Cache(make(), make(), batch, capacity)

    @torch.inference_mode()
    def forward(self, step: Step, cache: Cache | None = None) -> np.ndarray:
        cache = cache if cache is not None else self.new_cache(step.input_ids.shape[0], step.mask.shape[1])
        past, new = cache.admit(step)
        out = self.run(self.upload(step, past), cache)
        cache.length = past + new
        return out.float().cpu().numpy()

    def upload(self, step: Step, past: int) -> StepTensors:
        """A step's arrays on the device, with what the ops need besides (RoPE frequencies, ALiBi slopes, and
        core's attention bias when the ops read it)."""
        new = step.input_ids.shape[1]
        inv_freq, rope_factor = None, 1.0
        if self.ir.attention.rotary_dim:
            inv_freq, rope_factor = self.rope_frequencies(step.positions[:, past:])
        bias = None
        if self.ops.reads_bias:
            heads = self.plan.heads if self.plan is not None else None
            bias = self._put(attention_bias(self.ir.attention, step.positions, step.mask, past, self.dtype,
                                            heads=heads)).to(self.torch_dtype)
        return StepTensors(
            input_ids=self._put(step.input_ids), positions=self._put(step.positions),
            new_positions=self._put(step.positions[:, past:]), mask=self._put(step.mask),
            slots=torch.arange(past, past + new, dtype=torch.int32, device=self.device),
            gather=self._put(step.gather) if step.gather is not None else None,
            inv_freq=inv_freq, rope_factor=rope_factor, alibi=self.alibi, past=past, dtype=self.torch_dtype,
            attention_bias=bias)

    def rope_frequencies(self, positions: np.ndarray) -> tuple[torch.Tensor, float]:
        """RoPE inverse frequencies [batch or 1, rotary_dim / 2] for query `positions`, kept on the device."""
        inv_freq, factor = rope_frequencies_per_row(self.ir.attention, positions)
        key = inv_freq.tobytes() + bytes(inv_freq.shape)
        if self._frequencies is None or self._frequencies[0] != key:  # only dynamic NTK scaling changes them
            self._frequencies = (key, self._put(inv_freq))
        return self._frequencies[1], factor

    def _put(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device)

    def run(self, step: StepTensors, cache: Cache) -> torch.Tensor:
        """The device side of a forward pass: head outputs in the compute dtype, the cache written.

        It uploads nothing and reads no host value of the step (`past`), so with ops that do neither
        (`TritonOps`) a CUDA graph can capture it and replay it on new contents of the same step tensors.
        """
        rotary = self._rotary(step) if step.inv_freq is not None else None
        if self.plan is None:
            x = self.ops.embed(step.input_ids, self.params.embed, self.embed_scale, self.params.embed_norm)
        else:
            x = self.ops.embed_rows(step.input_ids, self.params.embed, self.plan, self.embed_scale,
                                    self.params.embed_norm)
        if self.params.positions is not None:  # learned positions (`polylm.ir.LearnedPositions`), replicated
            x = x + self.params.positions[step.new_positions]
        delta = None
        for index, layer in enumerate(self.params.layers):
            x, delta = self._block(x, delta, layer, cache, index, step, rotary)
        _, x = self.ops.add_norm(x, delta, self.params.final_norm)
        if step.gather is not None:
            x = self.ops.gather(x, step.gather)
        out = self.ops.linear(x, self.params.head, self.params.head_bias)
        if self.plan is not None and self.plan.head_rows is not None:
            out = self.ops.gather_columns(out, self.plan.head_sizes)
        return out

    def _block(self, x: torch.Tensor, delta: torch.Tensor | None, layer: LayerParams, cache: Cache, index: int,
               step: StepTensors, rotary: tuple[torch.Tensor, torch.Tensor] | None,
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer (see `polylm.ir.Block`) on the residual stream `x + delta`; returns the next (residual, delta)
        pair, so that each residual add happens inside the norm that follows it."""
        block = self.ir.block
        x, normed = self._add_norm(x, delta, layer.attn_norm)
        attended = self._branch(self._attention(normed, layer, cache, index, step, rotary), layer.attn_post_norm)
        if block.parallel:
            mlp_in = normed if layer.mlp_norm is None else self.ops.norm(x, layer.mlp_norm)
            return x, attended + self._branch(self._mlp(mlp_in, layer), layer.mlp_post_norm)
        residual = normed if block.residual_from_normed else x
        x, normed = self._add_norm(residual, attended, layer.mlp_norm)
        residual = normed if block.residual_from_normed else x
        return residual, self._branch(self._mlp(normed, layer), layer.mlp_post_norm)

    def _add_norm(self, x: torch.Tensor, delta: torch.Tensor | None, norm: NormParams | None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual sum and its norm (the sum itself where the block has no norm there)."""
        if norm is not None:
            return self.ops.add_norm(x, delta, norm)
        x = x if delta is None else x + delta
        return x, x

    def _branch(self, out: torch.Tensor, post_norm: NormParams | None) -> torch.Tensor:
        """A branch's output as it is added to the residual stream: post-normed and scaled where the IR says."""
        if post_norm is not None:
            out = self.ops.norm(out, post_norm)
        scale = self.ir.block.residual_scale
        return out if scale == 1.0 else out * scale

    def _mlp(self, x: torch.Tensor, layer: LayerParams) -> torch.Tensor:
        hidden = self.ops.activation(self.ops.linear(x, layer.up, layer.up_bias), self.ir.block.mlp)
        return self.ops.reduce(self.ops.linear(hidden, layer.down, layer.down_bias))

    def _attention(self, x: torch.Tensor, layer: LayerParams, cache: Cache, index: int, step: StepTensors,
                   rotary: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        attn = self.local.attention
        keys, values = cache.keys[index], cache.values[index]
        qkv = self.ops.linear(x, layer.qkv, layer.qkv_bias)
        if attn.qk_norm is not None:
            qkv = self._qk_norm(qkv, layer, attn)
        q = self.ops.rope_and_cache(qkv, keys, values, rotary, step, attn)
        out = self.ops.attention(q, keys, values, step, attn)
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

    def _rotary(self, step: StepTensors) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [batch, new, rotary_dim / 2], float32, for the new tokens' positions."""
        angles = step.new_positions.float()[..., None] * step.inv_freq[:, None, :]
        return angles.cos() * step.rope_factor, angles.sin() * step.rope_factor
