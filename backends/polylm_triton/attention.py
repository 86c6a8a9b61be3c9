"""Attention over the KV cache as Triton kernels: one flash-style kernel for prefill and decode, split over
the keys (split-KV) when the batch and heads alone cannot fill the GPU, plus the kernel merging the splits.

A program takes the query heads that share one KV head (GQA/MQA: `kv_head = head // group`, transformers'
`repeat_kv` order) for a block of new tokens, so each key/value tile is read once for the whole group.
Visibility comes from the step only: a query in cache slot s sees slot j ≤ s whose mask is set (in a sliding-window
ring, real keys fewer than `window` positions before the query's own: `WINDOW`); ALiBi adds
slope · (position_j − position_s). The key loop stops at the block's last query slot, read from the device, so
the same launch serves a cache of any fill. A logit softcap (`Attention.softcap`, Gemma 2) caps each scaled
score to softcap·tanh(score / softcap) before ALiBi and the mask (SOFTCAP, a compile-time switch). Attention sinks
(`Attention.sinks`, gpt-oss: a logit per head that joins the softmax's denominator with no value) start the running
max and sum at the sink's logit and 1 (HAS_SINKS; in split-KV, the first split's only), so a fully masked row then
gives 0. Masked scores get a large finite negative value rather than −inf:
a fully masked (padding) row then averages values instead of dividing 0 by 0, and any visible key wipes
those terms out (their weight underflows to exactly 0).
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from polylm.ir import Attention

LOG2E = 1.4426950408889634
#: keys one split covers at least, and splits per streaming multiprocessor aimed for
MIN_SPLIT_KEYS = 128
PROGRAMS_PER_SM = 2


@triton.jit
def _attention_kernel(
        q_ptr, k_ptr, v_ptr, out_ptr, max_ptr, sum_ptr, mask_ptr, positions_ptr, slots_ptr, slopes_ptr,
        query_positions_ptr, sinks_ptr, batch, new, keys, split_keys, score_scale, cap_log2,
        stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
        stride_mask, stride_positions, stride_query_positions,
        NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_ALIBI: tl.constexpr,
        WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, HAS_SINKS: tl.constexpr, SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    GROUP: tl.constexpr = NUM_HEADS // NUM_KV_HEADS
    b = tl.program_id(0) // NUM_KV_HEADS
    kv_head = tl.program_id(0) % NUM_KV_HEADS
    split = tl.program_id(2)
    # a row is (new token, query head of the group)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    n_rows = new * GROUP
    row_ok = rows < n_rows
    t = tl.minimum(rows // GROUP, new - 1)
    head = kv_head * GROUP + rows % GROUP
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    b64 = b.to(tl.int64)

    q = tl.load(q_ptr + b64 * stride_qb + head[:, None] * stride_qh + t[:, None] * stride_qt + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if WINDOW:  # a sliding-window ring: every key slot may hold a visible key; visibility by positions
        query_position = tl.load(query_positions_ptr + b64 * stride_query_positions + t)
        end = keys
    else:
        query_slot = tl.load(slots_ptr + t)
        last_t = tl.minimum(tl.program_id(1) * BLOCK_M + BLOCK_M - 1, n_rows - 1) // GROUP
        end = tl.minimum(tl.load(slots_ptr + last_t) + 1, keys)
        if HAS_ALIBI:
            query_position = tl.load(positions_ptr + b64 * stride_positions + query_slot)
    start = split * split_keys
    stop = tl.minimum(start + split_keys, end)
    if HAS_ALIBI:
        slope = tl.load(slopes_ptr + head) * 1.4426950408889634

    row_max = tl.full([BLOCK_M], -1.0e30, tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    if HAS_SINKS:  # the sink as one more score (in log2 units) whose value is 0, counted by the first split
        sink = tl.load(sinks_ptr + head).to(tl.float32) * 1.4426950408889634
        row_max = tl.where(split == 0, sink, row_max)
        row_sum = tl.where(split == 0, row_sum + 1.0, row_sum)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for key_start in range(start, stop, BLOCK_N):
        key = key_start + tl.arange(0, BLOCK_N)
        key_ok = key < stop
        kv_mask = key_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + b64 * stride_kb + kv_head * stride_kh + key.to(tl.int64)[:, None] * stride_ks + d[None, :],
                    mask=kv_mask, other=0.0)
        # scores in log2 units: without a softcap score_scale is scale·log2(e); with one, score_scale is
        # scale / softcap and cap_log2 softcap·log2(e), and tanh(x) = 1 − 2 / (e^2x + 1) (±1 where e^2x overflows)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * score_scale
        if SOFTCAP:
            scores = cap_log2 * (1.0 - 2.0 / (tl.math.exp2(scores * 2.8853900817779268) + 1.0))
        if HAS_ALIBI or WINDOW:
            key_position = tl.load(positions_ptr + b64 * stride_positions + key, mask=key_ok, other=0)
        if HAS_ALIBI:
            scores += slope[:, None] * (key_position[None, :] - query_position[:, None]).to(tl.float32)
        real = tl.load(mask_ptr + b64 * stride_mask + key, mask=key_ok, other=0) != 0
        if WINDOW:
            distance = query_position[:, None] - key_position[None, :]
            visible = real[None, :] & (distance >= 0) & (distance < WINDOW)
        else:
            visible = real[None, :] & (key[None, :] <= query_slot[:, None])
        scores = tl.where(visible, scores, -1.0e30)
        new_max = tl.maximum(row_max, tl.max(scores, axis=1))
        rescale = tl.math.exp2(row_max - new_max)
        p = tl.where(key_ok[None, :], tl.math.exp2(scores - new_max[:, None]), 0.0)
        row_sum = row_sum * rescale + tl.sum(p, axis=1)
        v = tl.load(v_ptr + b64 * stride_vb + kv_head * stride_vh + key.to(tl.int64)[:, None] * stride_vs + d[None, :],
                    mask=kv_mask, other=0.0)
        acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        row_max = new_max

    # output row (b, t, head) of [batch, new, heads, head_dim]; split partials are [splits, batch·new·heads, …]
    out_row = (b64 * new + t) * NUM_HEADS + head
    store_mask = row_ok[:, None] & d_ok[None, :]
    if SPLIT:
        part_row = split * (batch * new * NUM_HEADS) + out_row
        tl.store(out_ptr + part_row[:, None] * HEAD_DIM + d[None, :], acc, mask=store_mask)
        tl.store(max_ptr + part_row, row_max, mask=row_ok)
        tl.store(sum_ptr + part_row, row_sum, mask=row_ok)
    else:
        out = acc / tl.where(row_sum > 0, row_sum, 1.0)[:, None]
        tl.store(out_ptr + out_row[:, None] * HEAD_DIM + d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=store_mask)


@triton.jit
def _merge_splits_kernel(acc_ptr, max_ptr, sum_ptr, out_ptr, n_rows, num_splits,
                         HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    s_ok = s < num_splits
    part = s.to(tl.int64) * n_rows + row
    part_max = tl.load(max_ptr + part, mask=s_ok, other=-1.0e30)
    weight = tl.where(s_ok, tl.math.exp2(part_max - tl.max(part_max, axis=0)), 0.0)
    total = tl.sum(weight * tl.load(sum_ptr + part, mask=s_ok, other=0.0), axis=0)
    acc = tl.load(acc_ptr + part[:, None] * HEAD_DIM + d[None, :], mask=s_ok[:, None] & (d < HEAD_DIM)[None, :],
                  other=0.0)
    out = tl.sum(weight[:, None] * acc, axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + row * HEAD_DIM + d, out.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


def attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
              positions: torch.Tensor, slots: torch.Tensor, alibi: torch.Tensor | None, attn: Attention,
              num_splits: int | None = None, query_positions: torch.Tensor | None = None,
              sinks: torch.Tensor | None = None) -> torch.Tensor:
    """q [batch, heads, new, head_dim] (any strides, unit in head_dim) attends to the cache's keys/values
    [batch, kv_heads, capacity, head_dim] within the first mask.shape[1] slots; the new tokens sit in `slots`
    [new] (int32). mask/positions are [batch, ≥ keys]. Returns [batch, new, heads·head_dim].

    A sliding-window layer's ring (`attn.window` set) passes the ring's keys instead: mask/positions [batch,
    keys] say which ring slots hold real keys and their positions (`polylm.numerics.masks.ring_keys`), and
    `query_positions` [batch, new] the new tokens'; a query at position p sees real keys in (p − window, p].
    `sinks` [heads]: the attention sinks' logits (`Attention.sinks`).

    `num_splits` forces the number of key splits (tests); by default it is chosen from the GPU's size."""
    batch, heads, new, head_dim = q.shape
    ring = query_positions is not None
    keys_len = mask.shape[1]
    group = heads // attn.num_kv_heads
    tiles = attention_tiles(head_dim, new * group, exact=q.dtype == torch.float32)
    block_m, block_n = tiles["BLOCK_M"], tiles["BLOCK_N"]
    row_blocks = triton.cdiv(new * group, block_m)
    programs = batch * attn.num_kv_heads * row_blocks
    if num_splits is None:
        num_splits = _splits(q.device, programs, keys_len)
    split_keys = triton.cdiv(triton.cdiv(keys_len, num_splits), block_n) * block_n
    num_splits = triton.cdiv(keys_len, split_keys)
    out = torch.empty((batch, new, heads, head_dim), dtype=q.dtype, device=q.device)
    if num_splits > 1:
        partial = torch.empty((num_splits, batch * new * heads, head_dim), dtype=torch.float32, device=q.device)
        row_max = torch.empty((num_splits, batch * new * heads), dtype=torch.float32, device=q.device)
        row_sum = torch.empty_like(row_max)
    else:
        partial, row_max, row_sum = out, out, out
    _attention_kernel[(batch * attn.num_kv_heads, row_blocks, num_splits)](
        q, keys, values, partial, row_max, row_sum, mask, positions, slots, alibi if alibi is not None else q,
        query_positions if ring else positions, sinks if sinks is not None else q, batch, new, keys_len, split_keys, *_score_scales(attn),
        q.stride(0), q.stride(1), q.stride(2), keys.stride(0), keys.stride(1), keys.stride(2),
        values.stride(0), values.stride(1), values.stride(2), mask.stride(0), positions.stride(0),
        query_positions.stride(0) if ring else 0,
        NUM_HEADS=heads, NUM_KV_HEADS=attn.num_kv_heads, HEAD_DIM=head_dim, HAS_ALIBI=alibi is not None,
        WINDOW=attn.window if ring else 0, SOFTCAP=attn.softcap is not None,
        HAS_SINKS=sinks is not None, SPLIT=num_splits > 1, **tiles)
    if num_splits > 1:
        n_rows = batch * new * heads
        _merge_splits_kernel[(n_rows,)](partial, row_max, row_sum, out, n_rows, num_splits, HEAD_DIM=head_dim,
                                        BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_D=tiles["BLOCK_D"],
                                        num_warps=1)
    return out.view(batch, new, heads * head_dim)


def _score_scales(attn: Attention) -> tuple[float, float]:
    """The kernel's (score_scale, cap_log2): how a dot product becomes a score in log2 units."""
    if attn.softcap is None:
        return attn.softmax_scale * LOG2E, 1.0
    return attn.softmax_scale / attn.softcap, attn.softcap * LOG2E


def attention_tiles(head_dim: int, rows: int, exact: bool) -> dict:
    """The pinned launch configuration for `rows` (new tokens × group heads) of `head_dim`; `exact` is float32.

    Shared memory stays under the 99 KB a consumer GPU gives one block: two pipeline stages for 16-bit tiles
    (98 KB at head_dim 256); float32 tiles, twice as large, get smaller query blocks and no pipelining
    (float32 is the exactness path, not the fast one), and IEEE dots rather than TF32.
    """
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_m = min(32 if exact and block_d >= 256 else 64, max(16, triton.next_power_of_2(rows)))
    return dict(BLOCK_M=block_m, BLOCK_N=64 if block_d <= 128 else 32, BLOCK_D=block_d,
                DOT_PRECISION="ieee" if exact else "tf32", num_warps=8 if block_m * block_d >= 8192 else 4,
                num_stages=1 if exact else 2)


def _splits(device: torch.device, programs: int, keys: int) -> int:
    """Key splits so that about PROGRAMS_PER_SM programs run per multiprocessor (1 on the interpreter's CPU)."""
    if device.type != "cuda":
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    wanted = math.ceil(PROGRAMS_PER_SM * _multiprocessors(index) / programs)
    return max(1, min(wanted, triton.cdiv(keys, MIN_SPLIT_KEYS)))


@functools.cache
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count
