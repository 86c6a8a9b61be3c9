"""Routed experts (`polylm.ir.MoE`) as a grouped matmul, after vLLM's fused_moe: the experts' matrices stacked
[experts, out, in] (float, or weight-only int8/int4 as `quantized` packs them), the (token, choice) pairs sorted
by expert on the device, and one kernel launch per projection whose programs cover (blocks of one expert's
rows × output tiles), each reading its expert's matrix through the expert's offset in the stack.

Nothing here synchronizes with the host or sizes a launch by the routing: the sort is torch's, the number of
blocks is bounded by the shapes alone (blocks past the routing's last have no expert and return at once), so a
CUDA graph can capture a step. An expert no token chose has no block: its matrices are not read.
"""

from __future__ import annotations

from typing import Callable

import torch
import triton
import triton.language as tl

from polylm.backend import ExpertParams
from polylm.ir import MoE
from polylm_torch_common.params import ModelParams

from .quantized import QuantizedWeight, accumulate, matmul_tiles, weight_tile

#: SCALE_MODE of float (unquantized) weights: nothing to scale
_FLOAT = 3

Stack = torch.Tensor | QuantizedWeight


def stack(matrices: list) -> Stack:
    """One expert matrix per list item (tensors, or `QuantizedWeight`s alike) as one stack [experts, out, in]."""
    first = matrices[0]
    if isinstance(first, QuantizedWeight):
        return QuantizedWeight(torch.stack([m.data for m in matrices]), torch.stack([m.scales for m in matrices]),
                               first.bits, first.group_size, first.in_features)
    return torch.stack(matrices)


def stack_params(params: ModelParams) -> None:
    """Replace the per-expert lists of the torch runtime's params (`polylm_torch_common.params`) by stacks over
    the experts, in place and a layer at a time; a bias list of Nones (no biases, or another rank's) is None."""
    for layer in params.layers:
        moe = layer.moe
        if moe is None:
            continue
        for name in ("experts_up", "experts_down"):
            setattr(moe, name, stack(getattr(moe, name)))
        for name in ("experts_up_bias", "experts_down_bias"):
            biases = getattr(moe, name)
            setattr(moe, name, None if biases[0] is None else torch.stack(biases))


def group_by_expert(chosen: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (token, choice) pairs of `chosen` [tokens, top_k] grouped by expert into blocks of `block_m`: the pair
    indices (token · top_k + choice) block by block [blocks · block_m], each expert's in token order and padded
    with the pair count; and each block's expert [blocks], `num_experts` for the spare blocks at the end. The
    number of blocks is the most the shapes allow (each chosen expert's last block may be partly filled)."""
    flat = chosen.flatten()
    pairs = flat.numel()
    device = flat.device
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device).scatter_add_(0, flat, torch.ones_like(flat))
    blocks = (counts + block_m - 1) // block_m
    block_end = blocks.cumsum(0)
    order = torch.argsort(flat, stable=True)  # the pairs by expert, each expert's in token order
    by_expert = flat[order]
    rank = torch.arange(pairs, device=device) - (counts.cumsum(0) - counts)[by_expert]  # within its expert
    destination = (block_end - blocks)[by_expert] * block_m + rank
    most = (pairs + min(num_experts, pairs) * (block_m - 1)) // block_m
    ids = torch.full((most * block_m,), pairs, dtype=torch.int64, device=device).scatter_(0, destination, order)
    experts = torch.searchsorted(block_end, torch.arange(most, device=device), right=True)
    return ids, experts


@triton.jit
def _grouped_matmul_kernel(x_ptr, w_ptr, scales_ptr, bias_ptr, route_ptr, ids_ptr, experts_ptr, y_ptr,
                           pairs, num_experts, N, K, group_size, per_x_row,
                           stride_xm, stride_we, stride_wn, stride_se, stride_sn, stride_be, stride_ym,
                           BITS: tl.constexpr, SCALE_MODE: tl.constexpr, HAS_BIAS: tl.constexpr,
                           HAS_ROUTE: tl.constexpr, USE_DOT: tl.constexpr, EXACT: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    expert = tl.load(experts_ptr + tl.program_id(1)).to(tl.int64)
    if expert >= num_experts:  # a spare block: the routing filled fewer
        return
    ids = tl.load(ids_ptr + tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M))
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_in, col_in = ids < pairs, cols < N
    # a pair's input row: its token's (`per_x_row` pairs a row: top_k for x), or its own (the activations)
    x_rows = x_ptr + (ids // per_x_row)[:, None] * stride_xm
    w_rows = w_ptr + expert * stride_we + cols.to(tl.int64)[:, None] * stride_wn
    s_rows = scales_ptr + expert * stride_se + cols.to(tl.int64) * stride_sn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_in = k < K
        x = tl.load(x_rows + k[None, :], mask=row_in[:, None] & k_in[None, :], other=0.0)
        if BITS == 0:
            w = tl.load(w_rows + k[None, :], mask=col_in[:, None] & k_in[None, :], other=0.0)
        else:
            w = weight_tile(w_rows, s_rows, k0, K, col_in, group_size, BITS, SCALE_MODE, BLOCK_K)
        acc = accumulate(acc, x, w, s_rows, k0, group_size, col_in, SCALE_MODE, USE_DOT, EXACT)
    if SCALE_MODE == 0:
        acc = acc * tl.load(s_rows, mask=col_in, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + expert * stride_be + cols, mask=col_in, other=0.0).to(tl.float32)[None, :]
    if HAS_ROUTE:  # the pair's routing weight (float32)
        acc = acc * tl.load(route_ptr + ids, mask=row_in, other=0.0)[:, None]
    tl.store(y_ptr + ids[:, None] * stride_ym + cols[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=row_in[:, None] & col_in[None, :])


def grouped_linear(x: torch.Tensor, weight: Stack, bias: torch.Tensor | None, ids: torch.Tensor,
                   experts: torch.Tensor, pairs: int, per_x_row: int, tiles: dict,
                   route: torch.Tensor | None = None) -> torch.Tensor:
    """Every pair's row through its expert's matrix: y[pair] = x[pair // per_x_row] @ weight[expert]ᵀ (+ bias[expert])
    (· route[pair]) → [pairs, out] in x's dtype, over the blocks of `group_by_expert` (made with `tiles`'
    BLOCK_M)."""
    quantized = isinstance(weight, QuantizedWeight)
    num_experts, out_features, in_features = weight.shape
    data = weight.data if quantized else weight
    scales = weight.scales if quantized else data  # a float stack has no scales: never read
    y = torch.empty((pairs, out_features), dtype=x.dtype, device=x.device)
    tiles = dict(tiles)
    if not quantized:
        tiles["SCALE_MODE"] = _FLOAT
    grid = (triton.cdiv(out_features, tiles["BLOCK_N"]), experts.shape[0])
    _grouped_matmul_kernel[grid](
        x, data, scales, bias if bias is not None else data, route if route is not None else data, ids, experts, y,
        pairs, num_experts, out_features, in_features, (weight.group_size or in_features) if quantized else 1,
        per_x_row, x.stride(0), data.stride(0), data.stride(1), scales.stride(0), scales.stride(1),
        bias.stride(0) if bias is not None else 0, y.stride(0), BITS=weight.bits if quantized else 0,
        HAS_BIAS=bias is not None, HAS_ROUTE=route is not None, EXACT=x.dtype == torch.float32, **tiles)
    return y


def routed_experts(x: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor, p: ExpertParams, moe: MoE,
                   activation: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """x [tokens, hidden] through the experts `chosen` [tokens, top_k] of each token, weighted by `weights`
    [tokens, top_k] (float32) and summed → [tokens, hidden]: the [gate; up] projection of every (token, choice)
    pair, `activation`, the down projection times the pair's weight, then each token's pairs summed."""
    x = x.contiguous()
    tokens, top_k = chosen.shape
    pairs = tokens * top_k
    if not pairs:
        return torch.zeros_like(x)
    group_size = p.experts_up.group_size if isinstance(p.experts_up, QuantizedWeight) else None
    # the tiles suit an expert's expected rows (at most `tokens`: a token chooses an expert once)
    tiles = matmul_tiles(min(tokens, triton.cdiv(pairs, moe.num_experts)), group_size, x.dtype == torch.float32)
    ids, experts = group_by_expert(chosen, moe.num_experts, tiles["BLOCK_M"])
    h = grouped_linear(x, p.experts_up, p.experts_up_bias, ids, experts, pairs, top_k, tiles)
    y = grouped_linear(activation(h), p.experts_down, p.experts_down_bias, ids, experts, pairs, 1, tiles,
                       route=weights.flatten().contiguous())
    return y.view(tokens, top_k, -1).sum(dim=1)
