"""The decoder forward pass in MLX over a preallocated KV cache; one-token decode steps run `mx.compile`d.

The whole pass is one lazy graph, evaluated once when the head outputs are read: the only host sync per step.
A decode step attends over a window of the cache rounded up to `DECODE_WINDOW` slots (the extra slots are
masked), so its shapes repeat and the compiled graph is reused from token to token.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from polylm.backend import Cache, Runtime, Step
from polylm.ir import ModelIR, RoPE
from polylm.numerics.masks import attention_bias
from polylm.parallel.plan import ShardPlan
from polylm.numerics.positions import rope_frequencies_per_row
from polylm.checkpoint.weights import Weights

from . import ops
from .params import MX_DTYPES, LayerParams, NormParams, build_params, read_tensors

#: Decode steps attend over the cache in multiples of this many slots (a new compiled shape per multiple).
DECODE_WINDOW = 256

Rotary = tuple[mx.array, mx.array]


class MLXRuntime(Runtime):
    """Runs a `ModelIR` with MLX arrays on MLX's default device; with a tensor-parallel `plan`, one rank's part
    of it (`parallel.MLXShardRuntime` sets `group`)."""

    group = None  # the mx.distributed group a tensor-parallel rank sums and gathers over

    def __init__(self, ir: ModelIR, weights: Weights, dtype: str, plan: ShardPlan | None = None) -> None:
        self.ir, self.dtype = ir, dtype
        self.mx_dtype = MX_DTYPES[dtype]
        # a tensor-parallel rank computes its own heads, MLP range and vocabulary rows (`polylm.parallel`)
        self.plan, self.local = plan, plan.local_ir if plan is not None else ir
        self.params = build_params(self.local, self.read_tensors(weights))
        self.embed_scale = mx.array(ir.embedding.scale, dtype=self.mx_dtype)
        attn = ir.attention
        self.rope_factor = (rope_frequencies_per_row(attn, np.zeros((1, 1), np.int64))[1]
                            if isinstance(attn.position, RoPE) else None)
        self._compiled_graph = mx.compile(self._graph)

    def read_tensors(self, weights: Weights) -> dict[str, mx.array]:
        """The canonical tensors this runtime holds, as arrays of the compute dtype."""
        return read_tensors(weights, self.mx_dtype)

    def new_cache(self, batch: int, capacity: int) -> Cache:
        attn = self.local.attention
        shape = (batch, attn.num_kv_heads, capacity, attn.head_dim)

        def make() -> list[mx.array]:
            return [mx.zeros(shape, dtype=self.mx_dtype) for _ in range(self.ir.num_layers)]

        cache = Cache(make(), make(), batch, capacity)
        mx.eval(cache.keys, cache.values)
        return cache

    def forward(self, step: Step, cache: Cache | None = None) -> np.ndarray:
        cache = cache if cache is not None else self.new_cache(step.input_ids.shape[0], step.mask.shape[1])
        past, new = cache.admit(step)
        end = past + new
        decode = new == 1
        window = min(cache.capacity, -(-end // DECODE_WINDOW) * DECODE_WINDOW) if decode else end
        bias = mx.array(attention_bias(self.ir.attention, step.positions, step.mask, past, self.dtype, window,
                                       self.plan.heads if self.plan is not None else None))
        query_positions = step.positions[:, past:]
        inv_freq = None
        if self.rope_factor is not None:
            inv_freq = mx.array(rope_frequencies_per_row(self.ir.attention, query_positions)[0])
        gather = mx.array(step.gather.astype(np.int32)) if step.gather is not None else None
        graph = self._compiled_graph if decode else self._graph
        positions = mx.array(query_positions.astype(np.int32))
        out, cache.keys, cache.values = graph(mx.array(step.input_ids.astype(np.int32)), positions, inv_freq,
                                              bias.astype(self.mx_dtype), mx.array([past], dtype=mx.int32),
                                              gather, cache.keys, cache.values)
        cache.length = end
        mx.eval(out, cache.keys, cache.values)
        return np.array(out)

    def _graph(self, ids: mx.array, positions: mx.array, inv_freq: mx.array | None, bias: mx.array, offset: mx.array,
               gather: mx.array | None, keys: list[mx.array], values: list[mx.array]
               ) -> tuple[mx.array, list[mx.array], list[mx.array]]:
        """Head outputs (float32) and the updated caches; pure in its array arguments, so it compiles."""
        params = self.params
        x = ops.embed_rows(ids, params.embed, self.plan, self.group)
        if self.ir.embedding.scale != 1.0:
            x = x * self.embed_scale
        if params.positions is not None:  # learned positions (`polylm.ir.LearnedPositions`), replicated
            x = x + params.positions[positions]
        if params.embed_norm is not None:
            x = ops.norm(x, params.embed_norm)
        cos_sin = ops.rotary(positions, inv_freq, self.rope_factor, self.mx_dtype) if inv_freq is not None else None
        new_keys, new_values = [], []
        last = len(params.layers) - 1
        for index, (layer, layer_keys, layer_values) in enumerate(zip(params.layers, keys, values)):
            # the last block needs its queries (and everything after attention) only at the gathered slots
            only = gather if index == last else None
            x, layer_keys, layer_values = self._block(x, layer, layer_keys, layer_values, offset, bias, cos_sin,
                                                      only)
            new_keys.append(layer_keys)
            new_values.append(layer_values)
        if gather is not None:
            x = x[:, 0]
        x = ops.norm(x, params.final_norm)
        out = ops.linear(x, params.head, params.head_bias)
        if self.plan is not None and self.plan.head_rows is not None:
            out = ops.gather_columns(out, self.plan.head_sizes, self.group)
        return out.astype(mx.float32), new_keys, new_values

    def _block(self, x: mx.array, layer: LayerParams, keys: mx.array, values: mx.array, offset: mx.array,
               bias: mx.array, cos_sin: Rotary | None, only: mx.array | None
               ) -> tuple[mx.array, mx.array, mx.array]:
        """One block (see `polylm.ir.Block`); with `only` [batch] its output keeps just that slot per row
        ([batch, 1, hidden])."""
        block = self.ir.block
        normed = x if layer.attn_norm is None else ops.norm(x, layer.attn_norm)
        attended, keys, values = self._attention(normed, layer, keys, values, offset, bias, cos_sin, only)
        attended = self._branch(attended, layer.attn_post_norm)
        if only is not None:
            x, normed = _slots(x, only, axis=1), _slots(normed, only, axis=1)
        if block.parallel:
            mlp_in = normed if layer.mlp_norm is None else ops.norm(x, layer.mlp_norm)
            return x + attended + self._branch(self._mlp(mlp_in, layer), layer.mlp_post_norm), keys, values
        x = (normed if block.residual_from_normed else x) + attended
        normed = x if layer.mlp_norm is None else ops.norm(x, layer.mlp_norm)
        residual = normed if block.residual_from_normed else x
        return residual + self._branch(self._mlp(normed, layer), layer.mlp_post_norm), keys, values

    def _branch(self, out: mx.array, post_norm: NormParams | None) -> mx.array:
        """A branch's output as it is added to the residual stream: post-normed and scaled where the IR says."""
        if post_norm is not None:
            out = ops.norm(out, post_norm)
        scale = self.ir.block.residual_scale
        return out if scale == 1.0 else out * scale

    def _mlp(self, x: mx.array, layer: LayerParams) -> mx.array:
        hidden = ops.activation(ops.linear(x, layer.up, layer.up_bias), self.ir.block.mlp)
        return ops.reduce(ops.linear(hidden, layer.down, layer.down_bias), self.group)

    def _attention(self, x: mx.array, layer: LayerParams, keys: mx.array, values: mx.array, offset: mx.array,
                   bias: mx.array, cos_sin: Rotary | None, only: mx.array | None
                   ) -> tuple[mx.array, mx.array, mx.array]:
        """Attention of the new slots (or of slot `only` per row) over the cache, after writing k/v into it."""
        attn = self.local.attention
        batch, new, _ = x.shape
        q_size, kv_size = attn.num_heads * attn.head_dim, attn.num_kv_heads * attn.head_dim
        q, k, v = mx.split(ops.linear(x, layer.qkv, layer.qkv_bias), (q_size, q_size + kv_size), axis=-1)
        if attn.qk_norm is not None and attn.qk_norm.scope == "projection":
            q, k = ops.norm(q, layer.q_norm), ops.norm(k, layer.k_norm)
        q = q.reshape(batch, new, attn.num_heads, attn.head_dim)
        k = k.reshape(batch, new, attn.num_kv_heads, attn.head_dim)
        if attn.qk_norm is not None and attn.qk_norm.scope != "projection":
            q, k = ops.norm(q, layer.q_norm), ops.norm(k, layer.k_norm)
        q, k = q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3)
        v = v.reshape(batch, new, attn.num_kv_heads, attn.head_dim).transpose(0, 2, 1, 3)
        if cos_sin is not None:
            q, k = ops.rope(q, *cos_sin, attn), ops.rope(k, *cos_sin, attn)
        keys = mx.slice_update(keys, k, offset, axes=(2,))
        values = mx.slice_update(values, v, offset, axes=(2,))
        if only is not None:
            q, bias = _slots(q, only, axis=2), _slots(bias, only, axis=2)
        window = bias.shape[-1]
        out = ops.attention(q, keys[:, :, :window], values[:, :, :window], bias, attn)
        out = out.transpose(0, 2, 1, 3).reshape(batch, q.shape[2], q_size)
        return ops.reduce(ops.linear(out, layer.out, layer.out_bias), self.group), keys, values


def _slots(t: mx.array, index: mx.array, axis: int) -> mx.array:
    """One slot per row of `t` along `axis` (kept, with length 1), at `index` [batch]."""
    shape = [1] * t.ndim
    shape[0] = -1
    return mx.take_along_axis(t, index.reshape(shape), axis=axis)
