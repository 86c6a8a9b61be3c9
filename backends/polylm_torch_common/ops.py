"""The reference primitive operations, one per IR feature, in plain torch: readable, and the oracle that every
kernel is tested against.

The backends subclass `ReferenceOps` and replace ops with their kernels (`polylm_torch.cpu_ops`,
`polylm_triton.ops`); the runtime only calls through an ops object, so all share the same model code.
`StepTensors` is what an op may know about the forward pass it serves.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from polylm.backend import ExpertParams, LayerParams
from polylm.ir import MLP, Attention, Block, MoE, RoPE
from polylm.parallel.plan import ShardPlan

from .params import NormParams, RowTable


@dataclass
class StepTensors:
    """One forward pass's inputs on the device (see `polylm.backend.Step`), as the ops read them.

    `past` is a host integer for ops that slice with it (these reference ops do). Ops that a CUDA graph may
    capture read tensors only — `slots` says where the new tokens go, `mask` and `positions` may be longer
    than `past + new` — because a replayed graph sees new tensor contents but the host values of its capture.
    """

    input_ids: torch.Tensor  # [batch, new]
    positions: torch.Tensor  # [batch, keys] position of the token in every cache slot
    new_positions: torch.Tensor  # [batch, new] positions of the new tokens
    mask: torch.Tensor  # [batch, keys] bool: the slot holds a real token
    slots: torch.Tensor  # [new] int32: cache slot of each new token (past, past + 1, …)
    gather: torch.Tensor | None  # [batch]: the one new token per row that reaches the head (an index into
    # `computed` when that is set)
    # per kind of RoPE the layers use: [batch or 1, rotary_dim / 2] float32 inverse frequencies, and the
    # multiplier of cos and sin (YaRN attention factor)
    frequencies: dict[RoPE, tuple[torch.Tensor, float]]
    alibi: torch.Tensor | None  # [heads] ALiBi slopes
    past: int
    dtype: torch.dtype
    # [batch, 1|heads, new, keys] in `dtype`: core's visibility rule (`polylm.numerics.masks.attention_bias`),
    # uploaded for ops that read it (`ReferenceOps.reads_bias`); None for ops with the rule in their kernel
    attention_bias: torch.Tensor | None = None
    # a sliding-window layer's ring (`polylm.backend.Ring`): [batch, new] the ring slot each new token's key goes
    # to; [batch, span] the positions of the keys in the ring slots attended and whether each is real
    # (`masks.ring_keys`); `attention_bias` is then the ring's (`masks.ring_bias`) for ops that read it
    ring_slots: torch.Tensor | None = None
    ring_positions: torch.Tensor | None = None
    ring_mask: torch.Tensor | None = None
    # the tensors of the layers with each sliding window, by window (the ring fields set)
    rings: dict[int, "StepTensors"] = field(default_factory=dict)
    # [tokens] the new slots the per-token layers compute (`Step.computed`, only with `gather`: indices into the
    # flattened [batch, new]); None: all of them. The runtime then holds the residual stream as [tokens, hidden]
    # and spreads it to [batch, new, ·] (zeros elsewhere) only around `rope_and_cache` and `attention`.
    computed: torch.Tensor | None = None

    @property
    def key_slots(self) -> int:
        """How many cache slots attention reads: the step's slots, or the ring slots of the pass."""
        return self.mask.shape[1] if self.ring_slots is None else self.ring_mask.shape[1]


def _lookup(table: torch.Tensor | RowTable, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` of an embedding table held as a tensor or by a prepared layer."""
    return table[ids] if isinstance(table, torch.Tensor) else table.rows(ids)


class ReferenceOps:
    """Reference implementations in plain torch, on any device. They call no compiled kernel themselves; a matrix
    that the runtime's `prepare` made a layer (`params.Prepare`) computes as that layer does."""

    #: a tensor-parallel rank's collectives (`parallel.Collectives`); None runs unsharded
    collectives = None
    #: whether `attention` reads `StepTensors.attention_bias`; ops whose kernel applies the visibility rule
    #: itself say False (and are tested equal to core's rule), so the runtime uploads no bias for them
    reads_bias = True

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over the ranks of a row-parallel output (attention output, MLP down); `x` when unsharded."""
        return x if self.collectives is None else self.collectives.all_reduce(x)

    def gather_columns(self, x: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
        """A vocab-parallel head's outputs from every rank (`sizes` of each, in rank order), concatenated on
        the last axis; `x` when unsharded."""
        return x if self.collectives is None else self.collectives.all_gather(x, sizes)

    def block(self, x: torch.Tensor, delta: torch.Tensor | None, block: Block, layer: LayerParams,
              keys: torch.Tensor, values: torch.Tensor, step: StepTensors,
              rotary: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A whole block in one call where the ops have one for it (the runtime's next residual and delta, as
        `Runtime._block` computes them with these ops); None: the runtime composes the block from the ops."""
        return None

    def embed_rows(self, ids: torch.Tensor, table: torch.Tensor | RowTable, plan: ShardPlan, scale: float,
                   norm: NormParams | None) -> torch.Tensor:
        """`embed` from a vocab-parallel table (`plan.vocab_rows`): ids outside this rank's range give zero rows
        here, so the sum over the ranks is every id's row; then the scale and the norm."""
        rows, inside = plan.vocab_rows(ids)
        x = self.reduce(torch.where(inside[..., None], _lookup(table, rows), 0))
        if scale != 1.0:
            x = x * scale
        return self.norm(x, norm) if norm is not None else x

    def norm(self, x: torch.Tensor, p: NormParams) -> torch.Tensor:
        """The norm over the last dim; a weight of more dims ([heads, head_dim]: `QKNorm` "head_each") scales
        each of x's trailing slices by its own row."""
        if p.spec.kind == "layer":
            if p.weight.dim() > 1:
                h = F.layer_norm(x, x.shape[-1:], None, None, p.spec.eps) * p.weight
                return h if p.bias is None else h + p.bias
            return F.layer_norm(x, x.shape[-1:], p.weight, p.bias, p.spec.eps)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + p.spec.eps) * p.weight
        if p.bias is not None:
            h = h + p.bias.float()
        return h.to(x.dtype)

    def add_norm(self, x: torch.Tensor, delta: torch.Tensor | None, p: NormParams) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual sum `x + delta` (just `x` without a delta) and its norm."""
        if delta is not None:
            x = x + delta
        return x, self.norm(x, p)

    def embed(self, ids: torch.Tensor, table: torch.Tensor | RowTable, scale: float,
              norm: NormParams | None) -> torch.Tensor:
        """Rows of `table` for `ids`, times `scale` (a value of the compute dtype), then normed if asked."""
        x = _lookup(table, ids)
        if scale != 1.0:
            x = x * scale
        return self.norm(x, norm) if norm is not None else x

    def linear(self, x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
        """`x @ weight.T + bias`; `weight` is a tensor, or a prepared layer (a callable holding its bias)."""
        if isinstance(weight, torch.Tensor):
            return F.linear(x, weight, bias)
        return weight(x)

    def rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn: Attention) -> torch.Tensor:
        """Rotate the first rotary dims of x [batch, heads, seq, head_dim]; cos/sin are [batch, 1, seq, rot/2]."""
        rot = attn.rotary_dim
        x_rot, x_pass = x[..., :rot], x[..., rot:]
        if attn.position.interleaved:
            even, odd = x_rot[..., 0::2], x_rot[..., 1::2]
            rotated = torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1).flatten(-2)
        else:
            first, second = x_rot[..., : rot // 2], x_rot[..., rot // 2:]
            rotated = torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)
        return torch.cat((rotated, x_pass), dim=-1) if x_pass.shape[-1] else rotated

    def rope_and_cache(self, qkv: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                       rotary: tuple[torch.Tensor, torch.Tensor] | None, step: StepTensors,
                       attn: Attention) -> torch.Tensor:
        """Split the fused projection qkv [batch, new, (heads + 2·kv_heads)·head_dim] into heads, rotate q and k
        (cos/sin [batch, new, rotary_dim / 2], float32; None without RoPE), write k and v into the layer's
        cache [batch, kv_heads, capacity, head_dim] at the step's slots, and return q [batch, heads, new, head_dim]."""
        batch, new, _ = qkv.shape
        q_size, kv_size = attn.num_heads * attn.head_dim, attn.num_kv_heads * attn.head_dim
        q, k, v = qkv.split((q_size, kv_size, kv_size), dim=-1)
        q = q.view(batch, new, attn.num_heads, attn.head_dim).transpose(1, 2)
        k = k.view(batch, new, attn.num_kv_heads, attn.head_dim).transpose(1, 2)
        v = v.view(batch, new, attn.num_kv_heads, attn.head_dim).transpose(1, 2)
        if rotary is not None:
            cos, sin = (t.to(qkv.dtype)[:, None] for t in rotary)
            q, k = self.rope(q, cos, sin, attn), self.rope(k, cos, sin, attn)
        if step.ring_slots is not None:  # a sliding-window layer: each token to its own ring slot
            rows = torch.arange(batch, device=qkv.device)[:, None]
            keys.transpose(1, 2)[rows, step.ring_slots] = k.transpose(1, 2)
            values.transpose(1, 2)[rows, step.ring_slots] = v.transpose(1, 2)
            return q
        keys[:, :, step.past:step.past + new] = k
        values[:, :, step.past:step.past + new] = v
        return q

    def attention(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, step: StepTensors,
                  attn: Attention, sinks: torch.Tensor | None = None) -> torch.Tensor:
        """q [batch, heads, new, d] attends to the cache's keys/values [batch, kv_heads, capacity, d] in the slots
        the step's mask covers; returns [batch, new, heads·d]. With a logit softcap or attention sinks (`sinks`
        [heads]: one more logit per head in the softmax, with no value), which SDPA cannot apply, it computes as
        transformers' eager attention: scores in q's dtype, capped, biased, softmax in float32."""
        batch, _, new, _ = q.shape
        end = step.key_slots
        keys, values = keys[:, :, :end], values[:, :, :end]
        if attn.softcap is None and sinks is None:
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=step.attention_bias,
                                                 scale=attn.softmax_scale,
                                                 enable_gqa=attn.num_heads != attn.num_kv_heads)
        else:
            group = attn.num_heads // attn.num_kv_heads
            keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
            scores = q @ keys.transpose(-1, -2) * attn.softmax_scale
            if attn.softcap is not None:
                scores = torch.tanh(scores / attn.softcap) * attn.softcap
            scores = scores + step.attention_bias
            if sinks is not None:
                sink = sinks.to(scores.dtype)[:, None, None].expand(batch, -1, new, 1)
                scores = torch.cat((scores, sink), dim=-1)
            weights = torch.softmax(scores, dim=-1, dtype=torch.float32)
            if sinks is not None:
                weights = weights[..., :-1]
            out = weights.to(q.dtype) @ values
        return out.transpose(1, 2).reshape(batch, new, -1)

    def activation(self, h: torch.Tensor, mlp: MLP) -> torch.Tensor:
        """The MLP's activation, applied to [gate; up] halves when gated."""
        if mlp.gated:
            gate, up = h.chunk(2, dim=-1)
            if mlp.activation == "swiglu_oai":  # gpt-oss's clamped SwiGLU
                gate, up = gate.clamp(max=mlp.limit), up.clamp(-mlp.limit, mlp.limit)
                return (up + 1) * gate * torch.sigmoid(gate * mlp.alpha)
            return _ACTIVATIONS[mlp.activation](gate) * up
        return _ACTIVATIONS[mlp.activation](h)

    def mlp(self, x: torch.Tensor, up, up_bias: torch.Tensor | None, down, down_bias: torch.Tensor | None,
            mlp: MLP) -> torch.Tensor:
        """A dense MLP (this rank's share of its output when tensor-parallel)."""
        return self.linear(self.activation(self.linear(x, up, up_bias), mlp), down, down_bias)

    def experts(self, x: torch.Tensor, p: ExpertParams, moe: MoE) -> torch.Tensor:
        """Routed experts (`polylm.ir.MoE`) on x [..., hidden]: each token through its top-k experts only, weighted
        as the routing says, plus the shared expert. Tokens are grouped by expert, so each chosen expert's
        matrices are read once per call and an expert no token chose is not read at all. Each expert's weighted
        output is rounded to x's dtype and summed in it, in the experts' order, as transformers does."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        out = self.routed(x, p, moe)
        if moe.shared is not None:
            shared = self.mlp(x, p.shared_up, p.shared_up_bias, p.shared_down, p.shared_down_bias, moe.shared)
            if p.shared_gate is not None:
                shared = torch.sigmoid(F.linear(x, p.shared_gate)) * shared
            out = out + shared
        return out.reshape(shape)

    def routed(self, x: torch.Tensor, p: ExpertParams, moe: MoE) -> torch.Tensor:
        """x [tokens, hidden] through the experts its router chooses (`route`), weighted and summed
        (`routed_experts`); the shared expert is not included."""
        weights, chosen = route(self.linear(x, p.router, p.router_bias), moe)
        return self.routed_experts(x, weights, chosen, p, moe)

    def routed_experts(self, x: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor, p: ExpertParams,
                       moe: MoE) -> torch.Tensor:
        """x [tokens, hidden] through the experts `chosen` for each token [tokens, top_k] (`route`), their outputs
        times `weights` [tokens, top_k] summed → [tokens, hidden]. Tokens are grouped by expert: one matmul per
        chosen expert (picked on the host, with one sync), none for an expert no token chose."""
        out = torch.zeros_like(x)
        for expert, rows, slots in _by_expert(chosen, moe.num_experts):  # a token names an expert once at most
            y = self.mlp(x[rows], p.experts_up[expert], p.experts_up_bias[expert], p.experts_down[expert],
                         p.experts_down_bias[expert], moe.expert)
            out[rows] += (y * weights[rows, slots, None]).to(out.dtype)
        return out

    def gather(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """One row per batch entry: x [batch, new, hidden] at new-index `index` [batch] → [batch, hidden]."""
        return x[torch.arange(x.shape[0], device=x.device), index]


def route(logits: torch.Tensor, moe: MoE) -> tuple[torch.Tensor, torch.Tensor]:
    """The weights (float32) and indices [tokens, top_k] of the experts each token's router `logits` choose."""
    logits = logits.float()
    if moe.routing == "topk_softmax":
        top, chosen = logits.topk(moe.top_k, dim=-1)
        return top.softmax(dim=-1), chosen
    weights, chosen = logits.softmax(dim=-1).topk(moe.top_k, dim=-1)
    if moe.normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, chosen


def _by_expert(chosen: torch.Tensor, num_experts: int) -> list[tuple[int, torch.Tensor | slice, torch.Tensor | int]]:
    """(expert, token rows, top-k slots) for each expert that some token of `chosen` [tokens, top_k] names, in
    the experts' order, after one host sync. For one token (decode) the rows are `slice(None)` and the slot an
    int, which index without copying."""
    if chosen.shape[0] == 1:
        return sorted((expert, slice(None), slot) for slot, expert in enumerate(chosen[0].tolist()))
    flat = chosen.flatten()
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    groups, start = [], 0
    for expert, count in enumerate(counts):
        if count:
            picked = order[start:start + count]
            groups.append((expert, picked // chosen.shape[1], picked % chosen.shape[1]))
        start += count
    return groups


def _relu2(x: torch.Tensor) -> torch.Tensor:
    return torch.square(F.relu(x))


_ACTIVATIONS = {
    "silu": F.silu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
    "relu2": _relu2,
}
