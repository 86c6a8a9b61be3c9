"""The MLX backend's primitive operations, one per IR feature.

`mx.fast` kernels are used where their semantics are the IR's: RMSNorm on float32 input (so the weight
multiply happens in float32, as the IR says), LayerNorm, and attention with an additive bias (but not with a
logit softcap, which it cannot apply: that attention is composed here). RoPE is composed
here because each row has its own positions and frequencies, which `mx.fast.rope`'s scalar offset cannot say.

Routed experts multiply each token by its chosen experts only, through `mx.gather_mm` / `mx.gather_qmm` over the
stacked expert matrices (as mlx-lm's SwitchGLU), inside the lazy graph: no expert choice is read on the host.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from polylm.backend import ExpertParams
from polylm.ir import MLP, Attention, MoE
from polylm.parallel.plan import ShardPlan, gather_padding, trim_gathered

from .params import Halves, Matrix, NormParams
from .quantize import QuantizedMatrix


def norm(x: mx.array, p: NormParams) -> mx.array:
    """LayerNorm in the compute dtype, or RMSNorm computed in float32 and rounded back to x's dtype. A weight of
    more dims ([heads, head_dim]: `QKNorm` "head_each") scales each of x's trailing slices by its own row."""
    each = p.weight.ndim > 1
    if p.spec.kind == "layer":
        if each:
            h = mx.fast.layer_norm(x, None, None, p.spec.eps) * p.weight
            return h if p.bias is None else h + p.bias
        return mx.fast.layer_norm(x, p.weight, p.bias, p.spec.eps)
    h = mx.fast.rms_norm(x.astype(mx.float32), None if each else p.weight, p.spec.eps)
    if each:
        h = h * p.weight
    if p.bias is not None:
        h = h + p.bias.astype(mx.float32)
    return h.astype(x.dtype)


def linear(x: mx.array, weight: Matrix, bias: mx.array | None = None) -> mx.array:
    """x @ weight (+ bias) in x's dtype: weight dense [in, out] or a `QuantizedMatrix` (see `params`). A float32
    weight (on the CPU) multiplies half-precision x in float32, the bias added before the one rounding to x's dtype
    (as MLX's half-precision matmul computes)."""
    if isinstance(weight, QuantizedMatrix):
        y = weight.matmul(x)
        return y if bias is None else y + bias
    if weight.dtype != x.dtype:
        y = _matmul(x.astype(weight.dtype), weight)
        return (y if bias is None else y + bias.astype(weight.dtype)).astype(x.dtype)
    if bias is None:
        return _matmul(x, weight)
    return _matmul(x, weight, bias)


#: Two CPU streams, on the CPU only: MLX's CPU BLAS (the reference one its wheel bundles) multiplies on one core,
#: so the column halves of a `Halves` operand multiply at once, one on each.
_CPU_STREAMS = (mx.new_stream(mx.cpu), mx.new_stream(mx.cpu)) if mx.default_device().type == mx.cpu else None


def _matmul(x: mx.array, weight: mx.array | Halves, bias: mx.array | None = None) -> mx.array:
    """x @ weight (+ bias through `mx.addmm`); a `Halves` operand's halves on the two `_CPU_STREAMS`."""
    if isinstance(weight, Halves):
        half = weight.left.shape[-1]
        biases = (None, None) if bias is None else (bias[:half], bias[half:])
        return mx.concatenate([_matmul_on(x, w, b, stream) for w, b, stream in
                               zip((weight.left, weight.right), biases, _CPU_STREAMS)], axis=-1)
    return _matmul_on(x, weight, bias)


def _matmul_on(x: mx.array, weight: mx.array, bias: mx.array | None, stream: mx.Stream | None = None) -> mx.array:
    return mx.matmul(x, weight, stream=stream) if bias is None else mx.addmm(bias, x, weight, stream=stream)


def rotary(positions: mx.array, inv_freq: mx.array, factor: float, dtype: mx.Dtype) -> tuple[mx.array, mx.array]:
    """cos and sin [batch, 1, new, rotary_dim / 2] in `dtype` for query `positions` [batch, new];
    `inv_freq` is [batch or 1, rotary_dim / 2] (see `polylm.numerics.positions.rope_frequencies_per_row`)."""
    angles = positions.astype(mx.float32)[..., None] * inv_freq[:, None, :]
    cos, sin = mx.cos(angles), mx.sin(angles)
    if factor != 1.0:
        cos, sin = cos * factor, sin * factor
    return cos.astype(dtype)[:, None], sin.astype(dtype)[:, None]


def rope(x: mx.array, cos: mx.array, sin: mx.array, attn: Attention) -> mx.array:
    """Rotate the first rotary dims of x [batch, heads, seq, head_dim]."""
    rot = attn.rotary_dim
    x_rot = x[..., :rot] if rot < attn.head_dim else x
    if attn.position.interleaved:
        even, odd = x_rot[..., 0::2], x_rot[..., 1::2]
        rotated = mx.stack((even * cos - odd * sin, odd * cos + even * sin), axis=-1).reshape(x_rot.shape)
    else:
        first, second = x_rot[..., : rot // 2], x_rot[..., rot // 2:]
        rotated = mx.concatenate((first * cos - second * sin, second * cos + first * sin), axis=-1)
    return mx.concatenate((rotated, x[..., rot:]), axis=-1) if rot < attn.head_dim else rotated


def attention(q: mx.array, k: mx.array, v: mx.array, bias: mx.array | str, attn: Attention,
              sinks: mx.array | None = None) -> mx.array:
    """q [batch, heads, new, d]; k/v [batch, kv_heads, keys, d] (GQA handled by the kernel);
    bias [batch, 1|heads, new, keys] in the compute dtype (or, without softcap and sinks, any mask
    `mx.fast.scaled_dot_product_attention` takes: "causal", a boolean one). With a logit softcap or attention sinks
    (`sinks` [heads]: one more logit per head in the softmax, with no value), as transformers' eager attention:
    scores in the compute dtype, capped, biased, softmax in float32."""
    if attn.softcap is None and sinks is None:
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=attn.softmax_scale, mask=bias)
    batch, heads, new, dim = q.shape
    grouped = (batch, k.shape[1], heads // k.shape[1], new)  # query heads by KV head (transformers' repeat_kv)
    scores = (q.reshape(*grouped, dim) @ k[:, :, None].swapaxes(-1, -2)) * attn.softmax_scale
    if attn.softcap is not None:
        scores = mx.tanh(scores / attn.softcap) * attn.softcap
    scores = scores + (bias[:, :, None] if bias.shape[1] == 1 else bias.reshape(*grouped, -1))
    if sinks is not None:
        sink = mx.broadcast_to(sinks.astype(scores.dtype).reshape(1, *grouped[1:3], 1, 1), (*grouped, 1))
        scores = mx.concatenate((scores, sink), axis=-1)
    weights = mx.softmax(scores.astype(mx.float32), axis=-1).astype(q.dtype)
    if sinks is not None:
        weights = weights[..., :-1]
    return (weights @ v[:, :, None]).reshape(batch, heads, new, dim)


def activation(h: mx.array, mlp: MLP) -> mx.array:
    """The MLP's activation, applied to [gate; up] halves when gated."""
    if mlp.gated:
        gate, up = mx.split(h, 2, axis=-1)
        if mlp.activation == "swiglu_oai":
            gate, up = mx.minimum(gate, mlp.limit), mx.clip(up, -mlp.limit, mlp.limit)
            return (up + 1) * gate * mx.sigmoid(gate * mlp.alpha)
        return _ACTIVATIONS[mlp.activation](gate) * up
    return _ACTIVATIONS[mlp.activation](h)


def mlp(x: mx.array, up: Matrix, up_bias: mx.array | None, down: Matrix, down_bias: mx.array | None, spec: MLP
        ) -> mx.array:
    """A dense MLP (this rank's share of its output when tensor-parallel)."""
    return linear(activation(linear(x, up, up_bias), spec), down, down_bias)


#: Routed tokens × top_k from which the experts' inputs are sorted by expert first (mlx-lm's SwitchGLU threshold):
#: each expert's matrix is then read once for a run of rows; a decode step's few rows gather unsorted.
SORT_FROM = 64


def route(logits: mx.array, moe: MoE) -> tuple[mx.array, mx.array]:
    """The weights (float32) and indices [..., top_k] of the experts the router `logits` choose (as
    `polylm_torch_common.ops.route`). The top k are in descending order, as torch.topk gives distinct values;
    `mx.argsort` is stable, so among tied scores the lower expert index comes first (torch.topk promises no
    order among ties: there the chosen set may differ, as between any two implementations)."""
    logits = logits.astype(mx.float32)
    scores = logits if moe.routing == "topk_softmax" else mx.softmax(logits, axis=-1)
    chosen = mx.argsort(-scores, axis=-1)[..., :moe.top_k]
    top = mx.take_along_axis(scores, chosen, axis=-1)
    if moe.routing == "topk_softmax":
        return mx.softmax(top, axis=-1), chosen
    return (top / top.sum(axis=-1, keepdims=True) if moe.normalize else top), chosen


def gather_linear(x: mx.array, weight: Matrix, bias: mx.array | None, indices: mx.array, sorted_indices: bool
                  ) -> mx.array:
    """x [..., 1, in] through expert `indices` [...] of a stacked `weight` (dense [experts, in, out] or quantized,
    see `params`), x broadcast against them: [..., 1, out] in x's dtype, each expert's bias (stacked [experts, out])
    added. A float32 stack (on the CPU, see `params`) multiplies x in float32."""
    if isinstance(weight, QuantizedMatrix):
        y = weight.gather_matmul(x, indices, sorted_indices)
    elif isinstance(weight, Halves):
        halves = zip((weight.left, weight.right), _CPU_STREAMS)
        y = mx.concatenate([mx.gather_mm(x.astype(w.dtype), w, rhs_indices=indices, sorted_indices=sorted_indices,
                                         stream=stream) for w, stream in halves], axis=-1).astype(x.dtype)
    else:
        y = mx.gather_mm(x.astype(weight.dtype), weight, rhs_indices=indices, sorted_indices=sorted_indices)
        y = y.astype(x.dtype)
    return y if bias is None else y + mx.expand_dims(bias[indices], -2)


def experts(x: mx.array, p: ExpertParams, moe: MoE) -> mx.array:
    """Routed experts (`polylm.ir.MoE`) on x [..., hidden]: each token through its top-k experts only, weighted as
    the routing says, plus the shared expert (scaled by its sigmoid gate); this rank's share when tensor-parallel."""
    weights, chosen = route(linear(x, p.router, p.router_bias), moe)
    rows, indices = mx.expand_dims(x, (-2, -3)), chosen  # [..., 1, 1, hidden] against [..., top_k]
    sort = chosen.size >= SORT_FROM
    if sort:  # one row per (token, slot), ordered by expert
        flat = chosen.flatten()
        order = mx.argsort(flat)
        rows, indices = x.reshape(-1, 1, x.shape[-1])[order // moe.top_k], flat[order]
    up = gather_linear(rows, p.experts_up, p.experts_up_bias, indices, sort)
    y = gather_linear(activation(up, moe.expert), p.experts_down, p.experts_down_bias, indices, sort)
    y = y[mx.argsort(order)].reshape(*chosen.shape, -1) if sort else y.squeeze(-2)  # [..., top_k, hidden]
    # each expert's weighted output rounded to x's dtype, then summed (as the reference accumulates them)
    out = (y * weights[..., None]).astype(x.dtype).sum(axis=-2)
    if moe.shared is not None:
        shared = mlp(x, p.shared_up, p.shared_up_bias, p.shared_down, p.shared_down_bias, moe.shared)
        if p.shared_gate is not None:
            shared = mx.sigmoid(linear(x, p.shared_gate)) * shared
        out = out + shared
    return out


_ACTIVATIONS = {
    "silu": nn.silu,
    "gelu_tanh": nn.gelu_approx,  # 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))
    "gelu": nn.gelu,  # exact, with erf
    "relu": nn.relu,
    "relu2": nn.relu2,
}


# Tensor parallelism (see `parallel`): with `group` None, the model runs unsharded and these do nothing extra.


def reduce(x: mx.array, group: mx.distributed.Group | None) -> mx.array:
    """The sum over the ranks of a row-parallel output (attention output, MLP down); `x` when unsharded."""
    return x if group is None else mx.distributed.all_sum(x, group=group)


def gather_columns(x: mx.array, sizes: tuple[int, ...], group: mx.distributed.Group | None) -> mx.array:
    """A vocab-parallel head's outputs from every rank (`sizes` of each, in rank order), concatenated on the
    last axis; `x` when unsharded. Uneven shares travel padded to the widest (`polylm.parallel.plan`)."""
    if group is None:
        return x
    pad = gather_padding(x.shape[-1], sizes)
    if pad:
        x = mx.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
    parts = mx.distributed.all_gather(x[None], group=group)
    return mx.concatenate(trim_gathered(list(parts), sizes), axis=-1)


def embed_rows(ids: mx.array, table: mx.array | QuantizedMatrix, dtype: mx.Dtype, plan: ShardPlan | None,
               group: mx.distributed.Group | None) -> mx.array:
    """Rows of `table` for `ids` in `dtype` (a quantized table's rows dequantized, scale · q); with a
    vocab-parallel table (`plan.vocab_rows`), ids outside this rank's range give zero rows here, so the sum over
    the ranks is every id's row."""
    if plan is None:
        return _rows(table, ids, dtype)
    rows, inside = plan.vocab_rows(ids)
    return reduce(mx.where(inside[..., None], _rows(table, rows, dtype), mx.zeros((), dtype)), group)


def _rows(table: mx.array | QuantizedMatrix, ids: mx.array, dtype: mx.Dtype) -> mx.array:
    if isinstance(table, QuantizedMatrix):
        return table.take_rows(ids).dequantize().astype(dtype)
    return table[ids]
