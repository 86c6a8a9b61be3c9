"""The decoder forward pass in MLX over a preallocated KV cache; one-token decode steps run `mx.compile`d.

The whole pass is one lazy graph, evaluated once when the head outputs are read: the only host sync per step.
A decode step attends over a window of the cache rounded up to `DECODE_WINDOW` slots (the extra slots are
masked), so its shapes repeat and the compiled graph is reused from token to token.

Attention visibility comes from core as an additive float32 bias (`polylm.numerics.masks`). A plain pass needs
none: when no slot of the step is masked, no layer keeps a ring, and no layer has ALiBi, a logit softcap or
sinks, a query at slot s sees exactly the key slots ≤ s. Then a prefill passes `mask="causal"` to
`mx.fast.scaled_dot_product_attention` and a decode step a boolean mask of its window built in the compiled graph
from the cache offset, with no bias made on the host (`plain_pass`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable

import mlx.core as mx
import numpy as np

from polylm.backend import Cache, Pass, Reduce, Reduced, Runtime, Step
from polylm.ir import ALiBi, Attention, Block, ModelIR, RoPE
from polylm.numerics.masks import attention_bias, ring_bias
from polylm.parallel.plan import ShardPlan
from polylm.numerics.positions import rope_frequencies_per_row
from polylm.checkpoint.weights import Weights

from . import ops
from .params import MX_DTYPES, LayerParams, NormParams, build_params, read_tensors
from .reduce import reduce_outputs

#: Decode steps attend over the cache in multiples of this many slots (a new compiled shape per multiple).
DECODE_WINDOW = 256

Rotary = tuple[mx.array, mx.array]
#: a sliding-window layer's pass inputs: the ring slot of each new token [batch, new] and the ring's bias
RingInputs = tuple[mx.array, mx.array]


def _round_up(slots: int) -> int:
    return -(-slots // DECODE_WINDOW) * DECODE_WINDOW


def plain_visibility(ir: ModelIR) -> bool:
    """Whether `ir`'s attention is causal order alone once no slot is masked: no ALiBi, softcap or sinks."""
    return all(not isinstance(block.attention.position, ALiBi) and block.attention.softcap is None
               and not block.attention.sinks for block in ir.blocks)


def plain_pass(part: Pass) -> bool:
    """Whether a pass of a model with plain visibility attends by causal order alone: no ring, no masked slot, and
    the gathered slot (if any) is the last one, so that a causal mask aligned to the last key holds for it."""
    step = part.step
    return (not part.rings and bool(step.mask.all())
            and (step.gather is None or bool((step.gather == part.new - 1).all())))


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
        # the attention of each kind of RoPE the layers use (Gemma 3's local layers have their own theta), and the
        # cos/sin multiplier of each
        self.ropes = {block.attention.position: block.attention for block in ir.blocks
                      if isinstance(block.attention.position, RoPE)}
        self.rope_factors = {rope: rope_frequencies_per_row(attn, np.zeros((1, 1), np.int64))[1]
                             for rope, attn in self.ropes.items()}
        self.plain = plain_visibility(ir)
        self._compiled_graph = mx.compile(self._graph)

    def read_tensors(self, weights: Weights) -> dict[str, mx.array]:
        """The canonical tensors this runtime holds, as arrays of the compute dtype."""
        return read_tensors(weights, self.mx_dtype)

    def new_cache(self, batch: int, capacity: int) -> Cache:
        attn = self.local.attention

        def make(slots: int) -> mx.array:
            return mx.zeros((batch, attn.num_kv_heads, slots, attn.head_dim), dtype=self.mx_dtype)

        cache = Cache.build(self.ir, batch, capacity, make)
        mx.eval(cache.keys, cache.values)
        return cache

    def forward(self, step: Step, cache: Cache | None = None) -> np.ndarray:
        return self._head_outputs(step, cache, np.array)

    def forward_top(self, step: Step, cache: Cache | None, reduce: Reduce) -> Reduced:
        return self._head_outputs(step, cache, lambda out: reduce_outputs(out, self.ir.head, reduce), reduce)

    def _head_outputs(self, step: Step, cache: Cache | None, take: Callable[[mx.array], Any],
                      reduce: Reduce | None = None) -> Any:
        """`step`'s head outputs (float32), each pass's through `take` (to numpy, or `reduce`d first)."""
        cache = cache if cache is not None else self.new_cache(step.input_ids.shape[0], step.mask.shape[1])
        return cache.run(step, lambda part: take(self._forward_pass(part, cache)), reduce)

    def _forward_pass(self, part: Pass, cache: Cache) -> mx.array:
        step, past = part.step, part.past
        end = past + part.new
        decode = part.new == 1
        heads = self.plan.heads if self.plan is not None else None
        window = min(cache.capacity, _round_up(end)) if decode else end
        if self.plain and plain_pass(part):
            bias = window  # the keys attended; which are visible is the graph's to say (`_visibility`)
        else:
            bias = mx.array(attention_bias(self.ir.attention, step.positions, step.mask, past, self.dtype, window,
                                           heads)).astype(self.mx_dtype)
        rings = {}
        for size, ring in part.rings.items():
            if decode:  # a repeating span too (the spare slot and the unfilled ones are never seen)
                ring = replace(ring, span=min(ring.owner.shape[1], _round_up(ring.span)))
            rings[size] = (mx.array(ring.slots.astype(np.int32)), mx.array(
                ring_bias(self.ir.attention, step.positions, step.mask, past, ring, self.dtype, heads)
            ).astype(self.mx_dtype))
        query_positions = step.positions[:, past:]
        inv_freqs = [mx.array(rope_frequencies_per_row(attn, query_positions)[0]) for attn in self.ropes.values()]
        gather = mx.array(step.gather.astype(np.int32)) if step.gather is not None else None
        graph = self._compiled_graph if decode else self._graph
        positions = mx.array(query_positions.astype(np.int32))
        out, cache.keys, cache.values = graph(mx.array(step.input_ids.astype(np.int32)), positions, inv_freqs, bias,
                                              rings, mx.array([past], dtype=mx.int32), gather, cache.keys,
                                              cache.values)
        mx.eval(out, cache.keys, cache.values)
        return out

    def _graph(self, ids: mx.array, positions: mx.array, inv_freqs: list[mx.array], bias: mx.array | int,
               rings: dict[int, RingInputs], offset: mx.array, gather: mx.array | None, keys: list[mx.array],
               values: list[mx.array]) -> tuple[mx.array, list[mx.array], list[mx.array]]:
        """Head outputs (float32) and the updated caches; pure in its array arguments, so it compiles. `bias` is the
        step's attention bias, or for a plain pass the number of key slots attended (a constant of the graph)."""
        params = self.params
        x = ops.embed_rows(ids, params.embed, self.mx_dtype, self.plan, self.group)
        if self.ir.embedding.scale != 1.0:
            x = x * self.embed_scale
        if params.positions is not None:  # learned positions (`polylm.ir.LearnedPositions`), replicated
            x = x + params.positions[positions]
        if params.embed_norm is not None:
            x = ops.norm(x, params.embed_norm)
        rotaries = {rope: ops.rotary(positions, inv_freq, self.rope_factors[rope], self.mx_dtype)
                    for rope, inv_freq in zip(self.ropes, inv_freqs)}
        if isinstance(bias, int):
            bias = _visibility(ids.shape[1], bias, offset)
        new_keys, new_values = [], []
        last = len(params.layers) - 1
        for index, (block, layer, layer_keys, layer_values) in enumerate(zip(self.local.layers, params.layers, keys,
                                                                             values)):
            # the last block needs its queries (and everything after attention) only at the gathered slots
            only = gather if index == last else None
            ring = rings.get(block.attention.window)
            x, layer_keys, layer_values = self._block(x, block, layer, layer_keys, layer_values, offset,
                                                      bias if ring is None else ring,
                                                      rotaries.get(block.attention.position), only)
            new_keys.append(layer_keys)
            new_values.append(layer_values)
        if gather is not None:
            x = x[:, 0]
        x = ops.norm(x, params.final_norm)
        out = ops.linear(x, params.head, params.head_bias)
        if self.plan is not None and self.plan.head_rows is not None:
            out = ops.gather_columns(out, self.plan.head_sizes, self.group)
        return out.astype(mx.float32), new_keys, new_values

    def _block(self, x: mx.array, block: Block, layer: LayerParams, keys: mx.array, values: mx.array,
               offset: mx.array, visibility: mx.array | Plain | RingInputs, cos_sin: Rotary | None,
               only: mx.array | None) -> tuple[mx.array, mx.array, mx.array]:
        """One block (see `polylm.ir.Block`); with `only` [batch] its output keeps just that slot per row
        ([batch, 1, hidden]). `visibility` is the step's attention bias, a plain pass's `Plain`, or a sliding-window
        layer's ring inputs."""
        normed = x if layer.attn_norm is None else ops.norm(x, layer.attn_norm)
        attended, keys, values = self._attention(normed, block.attention, layer, keys, values, offset, visibility,
                                                 cos_sin, only)
        attended = self._branch(attended, block, layer.attn_post_norm)
        if only is not None:
            x, normed = _slots(x, only, axis=1), _slots(normed, only, axis=1)
        if block.parallel:
            mlp_in = normed if layer.mlp_norm is None else ops.norm(x, layer.mlp_norm)
            mlp_out = self._branch(self._mlp(mlp_in, block, layer), block, layer.mlp_post_norm)
            return x + attended + mlp_out, keys, values
        x = (normed if block.residual_from_normed else x) + attended
        normed = x if layer.mlp_norm is None else ops.norm(x, layer.mlp_norm)
        residual = normed if block.residual_from_normed else x
        return residual + self._branch(self._mlp(normed, block, layer), block, layer.mlp_post_norm), keys, values

    @staticmethod
    def _branch(out: mx.array, block: Block, post_norm: NormParams | None) -> mx.array:
        """A branch's output as it is added to the residual stream: post-normed and scaled where the IR says."""
        if post_norm is not None:
            out = ops.norm(out, post_norm)
        return out if block.residual_scale == 1.0 else out * block.residual_scale

    def _mlp(self, x: mx.array, block: Block, layer: LayerParams) -> mx.array:
        if layer.moe is not None:
            return ops.reduce(ops.experts(x, layer.moe, block.mlp), self.group)
        return ops.reduce(ops.mlp(x, layer.up, layer.up_bias, layer.down, layer.down_bias, block.mlp), self.group)

    def _attention(self, x: mx.array, attn: Attention, layer: LayerParams, keys: mx.array, values: mx.array,
                   offset: mx.array, visibility: mx.array | Plain | RingInputs, cos_sin: Rotary | None,
                   only: mx.array | None) -> tuple[mx.array, mx.array, mx.array]:
        """Attention of the new slots (or of slot `only` per row) over the cache, after writing k/v into it (at
        the step's slots, or a sliding-window layer's ring slots)."""
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
        if isinstance(visibility, tuple):
            ring_slots, bias = visibility
            ring_slots = ring_slots[:, None, :, None]
            keys = mx.put_along_axis(keys, ring_slots, k, axis=2)
            values = mx.put_along_axis(values, ring_slots, v, axis=2)
        else:
            bias = visibility
            keys = mx.slice_update(keys, k, offset, axes=(2,))
            values = mx.slice_update(values, v, offset, axes=(2,))
        if isinstance(bias, Plain):
            window, bias = bias.keys, bias.mask
            if only is not None:
                q = _slots(q, only, axis=2)  # the last slot (`plain_pass`): the causal mask still holds for it
        else:
            if only is not None:
                q, bias = _slots(q, only, axis=2), _slots(bias, only, axis=2)
            window = bias.shape[-1]
        out = ops.attention(q, keys[:, :, :window], values[:, :, :window], bias, attn, layer.sinks)
        out = out.transpose(0, 2, 1, 3).reshape(batch, q.shape[2], q_size)
        return ops.reduce(ops.linear(out, layer.out, layer.out_bias), self.group), keys, values


@dataclass(frozen=True)
class Plain:
    """A plain pass's visibility (`plain_pass`): the first `keys` cache slots, under `mask` as
    `mx.fast.scaled_dot_product_attention` takes it."""

    keys: int
    mask: mx.array | str


def _visibility(new: int, keys: int, offset: mx.array) -> Plain:
    """A plain pass's visibility over `keys` slots: causal for a prefill (aligned to the last key, so the
    queries at slots [keys − new, keys) each see the keys up to their own); for a decode step, over a window of
    the cache, the slots up to the new one (`offset`, the filled slots before it)."""
    return Plain(keys, "causal" if new > 1 else mx.arange(keys) <= offset)


def _slots(t: mx.array, index: mx.array, axis: int) -> mx.array:
    """One slot per row of `t` along `axis` (kept, with length 1), at `index` [batch]."""
    shape = [1] * t.ndim
    shape[0] = -1
    return mx.take_along_axis(t, index.reshape(shape), axis=axis)
