"""RMSNorm / LayerNorm as Triton kernels, fused with the residual add before them, and the token-embedding
lookup fused with its scale and optional norm. Statistics are float32; weights already carry their offset."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from polylm_torch_common.params import NormParams

from .config import row_tile


@triton.jit
def normalize(x, cols, n_cols, eps, weight_ptr, bias_ptr, IS_RMS: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Norm of the rows of x [rows, BLOCK_COLS] (float32, zero past `n_cols`), scaled and shifted."""
    in_row = cols < n_cols
    if IS_RMS:
        y = x * tl.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)[:, None]
    else:
        centered = tl.where(in_row[None, :], x - (tl.sum(x, axis=1) / n_cols)[:, None], 0.0)
        y = centered * tl.rsqrt(tl.sum(centered * centered, axis=1) / n_cols + eps)[:, None]
    y = y * tl.load(weight_ptr + cols, mask=in_row, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + cols, mask=in_row, other=0.0).to(tl.float32)[None, :]
    return y


@triton.jit
def _add_norm_kernel(x_ptr, delta_ptr, sum_ptr, out_ptr, weight_ptr, bias_ptr, n_rows, n_cols, eps,
                     HAS_DELTA: tl.constexpr, IS_RMS: tl.constexpr, HAS_BIAS: tl.constexpr,
                     BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_COLS)
    inside = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    offsets = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
    x = tl.load(x_ptr + offsets, mask=inside, other=0.0)
    if HAS_DELTA:
        # the sum is rounded to the compute dtype before the norm reads it, as an unfused add would be
        x = (x.to(tl.float32) + tl.load(delta_ptr + offsets, mask=inside, other=0.0).to(tl.float32))
        x = x.to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + offsets, x, mask=inside)
    y = normalize(x.to(tl.float32), cols, n_cols, eps, weight_ptr, bias_ptr, IS_RMS, HAS_BIAS)
    tl.store(out_ptr + offsets, y.to(out_ptr.dtype.element_ty), mask=inside)


def add_norm(x: torch.Tensor, delta: torch.Tensor | None, p: NormParams) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, norm(x + delta)) over the last dim; without a delta, (x, norm(x))."""
    x = x.contiguous()
    n_cols = x.shape[-1]
    n_rows = x.numel() // n_cols
    summed = torch.empty_like(x) if delta is not None else x
    normed = torch.empty_like(x)
    block_rows, block_cols, num_warps = row_tile(n_rows, n_cols)
    _add_norm_kernel[(triton.cdiv(n_rows, block_rows),)](
        x, delta.contiguous() if delta is not None else x, summed, normed, p.weight,
        p.bias if p.bias is not None else p.weight, n_rows, n_cols, p.spec.eps,
        HAS_DELTA=delta is not None, IS_RMS=p.spec.kind == "rms", HAS_BIAS=p.bias is not None,
        BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols, num_warps=num_warps)
    return summed, normed


@triton.jit
def _embed_kernel(ids_ptr, table_ptr, out_ptr, weight_ptr, bias_ptr, n_rows, n_cols, scale, eps,
                  HAS_SCALE: tl.constexpr, HAS_NORM: tl.constexpr, IS_RMS: tl.constexpr, HAS_BIAS: tl.constexpr,
                  BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_COLS)
    inside = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    ids = tl.load(ids_ptr + rows, mask=rows < n_rows, other=0).to(tl.int64)
    x = tl.load(table_ptr + ids[:, None] * n_cols + cols[None, :], mask=inside, other=0.0)
    if HAS_SCALE:
        x = (x.to(tl.float32) * scale).to(out_ptr.dtype.element_ty)
    if HAS_NORM:
        x = normalize(x.to(tl.float32), cols, n_cols, eps, weight_ptr, bias_ptr, IS_RMS, HAS_BIAS)
    offsets = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
    tl.store(out_ptr + offsets, x.to(out_ptr.dtype.element_ty), mask=inside)


def embed(ids: torch.Tensor, table: torch.Tensor, scale: float, norm: NormParams | None) -> torch.Tensor:
    """Rows of `table` for `ids` [...], times `scale` (a value of the table's dtype), normed if asked."""
    flat = ids.reshape(-1).contiguous()
    n_rows, n_cols = flat.numel(), table.shape[1]
    out = torch.empty((*ids.shape, n_cols), dtype=table.dtype, device=table.device)
    block_rows, block_cols, num_warps = row_tile(n_rows, n_cols)
    weight = norm.weight if norm is not None else table
    bias = norm.bias if norm is not None and norm.bias is not None else weight
    _embed_kernel[(triton.cdiv(n_rows, block_rows),)](
        flat, table, out, weight, bias, n_rows, n_cols, scale, norm.spec.eps if norm is not None else 0.0,
        HAS_SCALE=scale != 1.0, HAS_NORM=norm is not None, IS_RMS=norm is not None and norm.spec.kind == "rms",
        HAS_BIAS=norm is not None and norm.bias is not None,
        BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols, num_warps=num_warps)
    return out
