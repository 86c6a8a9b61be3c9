"""One Triton kernel that splits the fused q/k/v projection into heads, rotates q and k (RoPE: interleaved or
half-split pairs, partial rotary) and writes k and v straight into the KV cache at the step's slots (or each
row's own ring slots)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from polylm.ir import Attention, RoPE

from .config import TILE, warps


@triton.jit
def _rope_and_cache_kernel(
        qkv_ptr, cos_ptr, sin_ptr, slots_ptr, q_ptr, k_ptr, v_ptr, n_rows, new, stride_slots,
        stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
        NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, ROTARY_DIM: tl.constexpr,
        INTERLEAVED: tl.constexpr, HAS_ROPE: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    HEADS: tl.constexpr = NUM_HEADS + 2 * NUM_KV_HEADS
    # a row is one head of one token; qkv [batch·new, HEADS·HEAD_DIM] holds row r at r·HEAD_DIM
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    d = tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    inside = row_ok[:, None] & (d < HEAD_DIM)[None, :]
    rows64 = rows.to(tl.int64)
    x = tl.load(qkv_ptr + rows64[:, None] * HEAD_DIM + d[None, :], mask=inside, other=0.0).to(tl.float32)
    token, head = rows // HEADS, rows % HEADS
    if HAS_ROPE:
        HALF: tl.constexpr = ROTARY_DIM // 2
        # output dim d pairs with `partner`: x[d]·cos ∓ x[partner]·sin, minus for the pair's first member
        if INTERLEAVED:
            pair, partner, first = d // 2, d ^ 1, (d % 2) == 0
        else:
            pair = d % HALF
            partner = tl.where(d < HALF, d + HALF, d - HALF)
            first = d < HALF
        rotating = row_ok[:, None] & (head < NUM_HEADS + NUM_KV_HEADS)[:, None] & (d < ROTARY_DIM)[None, :]
        other = tl.load(qkv_ptr + rows64[:, None] * HEAD_DIM + partner[None, :], mask=rotating, other=0.0)
        angle = token.to(tl.int64)[:, None] * HALF + pair[None, :]
        cos = tl.load(cos_ptr + angle, mask=rotating, other=1.0)
        sin = tl.load(sin_ptr + angle, mask=rotating, other=0.0)
        other = other.to(tl.float32)
        x = tl.where(rotating, x * cos + tl.where(first[None, :], -other, other) * sin, x)
    batch, t = (token // new).to(tl.int64), token % new
    slot = tl.load(slots_ptr + batch * stride_slots + t, mask=row_ok, other=0).to(tl.int64)
    is_q = head < NUM_HEADS
    is_v = head >= NUM_HEADS + NUM_KV_HEADS
    is_k = ~is_q & ~is_v
    q_row = token.to(tl.int64) * NUM_HEADS + head
    tl.store(q_ptr + q_row[:, None] * HEAD_DIM + d[None, :], x.to(q_ptr.dtype.element_ty),
             mask=inside & is_q[:, None])
    k_row = batch * stride_kb + (head - NUM_HEADS) * stride_kh + slot * stride_ks
    tl.store(k_ptr + k_row[:, None] + d[None, :], x.to(k_ptr.dtype.element_ty), mask=inside & is_k[:, None])
    v_row = batch * stride_vb + (head - NUM_HEADS - NUM_KV_HEADS) * stride_vh + slot * stride_vs
    tl.store(v_ptr + v_row[:, None] + d[None, :], x.to(v_ptr.dtype.element_ty), mask=inside & is_v[:, None])


def rope_and_cache(qkv: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                   rotary: tuple[torch.Tensor, torch.Tensor] | None, slots: torch.Tensor,
                   attn: Attention) -> torch.Tensor:
    """See `ReferenceOps.rope_and_cache`: qkv [batch, new, (heads + 2·kv_heads)·head_dim] → q [batch, heads, new,
    head_dim] (a transposed view); k and v land in `keys`/`values` [batch, kv_heads, capacity, head_dim]
    (unit stride in head_dim) at `slots`: [new], the same in every row, or [batch, new] (a sliding-window ring's)."""
    batch, new, _ = qkv.shape
    qkv = qkv.contiguous()
    q = torch.empty((batch, new, attn.num_heads, attn.head_dim), dtype=qkv.dtype, device=qkv.device)
    n_rows = batch * new * (attn.num_heads + 2 * attn.num_kv_heads)
    block_d = triton.next_power_of_2(attn.head_dim)
    block_rows = max(1, min(triton.next_power_of_2(n_rows), TILE // block_d))
    cos, sin = (t.contiguous() for t in rotary) if rotary is not None else (qkv, qkv)
    rope = attn.position
    _rope_and_cache_kernel[(triton.cdiv(n_rows, block_rows),)](
        qkv, cos, sin, slots, q, keys, values, n_rows, new, slots.stride(0) if slots.dim() == 2 else 0,
        keys.stride(0), keys.stride(1), keys.stride(2), values.stride(0), values.stride(1), values.stride(2),
        NUM_HEADS=attn.num_heads, NUM_KV_HEADS=attn.num_kv_heads, HEAD_DIM=attn.head_dim,
        ROTARY_DIM=max(attn.rotary_dim, 2), INTERLEAVED=isinstance(rope, RoPE) and rope.interleaved,
        HAS_ROPE=rotary is not None, BLOCK_ROWS=block_rows, BLOCK_D=block_d,
        num_warps=warps(block_rows * block_d))
    return q.transpose(1, 2)
