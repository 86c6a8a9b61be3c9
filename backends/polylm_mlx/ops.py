"""The MLX backend's primitive operations, one per IR feature.

`mx.fast` kernels are used where their semantics are the IR's: RMSNorm on float32 input (so the weight
multiply happens in float32, as the IR says), LayerNorm, and attention with an additive bias (but not with a
logit softcap, which it cannot apply: that attention is composed here). RoPE is composed
here because each row has its own positions and frequencies, which `mx.fast.rope`'s scalar offset cannot say.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from polylm.ir import MLP, Attention
from polylm.parallel.plan import ShardPlan, gather_padding, trim_gathered

from .params import Matrix, NormParams
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
    """x @ weight (+ bias): weight dense [in, out] or a `QuantizedMatrix` (see `params`)."""
    if isinstance(weight, QuantizedMatrix):
        y = weight.matmul(x)
        return y if bias is None else y + bias
    if bias is None:
        return x @ weight
    return mx.addmm(bias, x, weight)


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


def attention(q: mx.array, k: mx.array, v: mx.array, bias: mx.array, attn: Attention,
              sinks: mx.array | None = None) -> mx.array:
    """q [batch, heads, new, d]; k/v [batch, kv_heads, keys, d] (GQA handled by the kernel);
    bias [batch, 1|heads, new, keys] in the compute dtype. With a logit softcap or attention sinks (`sinks`
    [heads]: one more logit per head in the softmax, with no value), as transformers' eager attention: scores in
    the compute dtype, capped, biased, softmax in float32."""
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


def embed_rows(ids: mx.array, table: mx.array, plan: ShardPlan | None, group: mx.distributed.Group | None
               ) -> mx.array:
    """Rows of `table` for `ids`; with a vocab-parallel table (`plan.vocab_rows`), ids outside this rank's range
    give zero rows here, so the sum over the ranks is every id's row."""
    if plan is None:
        return table[ids]
    rows, inside = plan.vocab_rows(ids)
    return reduce(mx.where(inside[..., None], table[rows], mx.zeros((), table.dtype)), group)
