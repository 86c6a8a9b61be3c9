"""The MLP activations (SiLU, tanh-GELU, exact GELU, ReLU, ReLU²) as one Triton kernel, fused with the gate
multiply of a gated MLP. Computed in float32 and rounded once."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from polylm.ir import MLP

from .config import TILE, warps


@triton.jit
def activate(x, ACTIVATION: tl.constexpr):
    """The activation of float32 x; tanh is written 2·sigmoid(2z) − 1 (no libdevice under the interpreter)."""
    if ACTIVATION == "silu":
        y = x * tl.sigmoid(x)
    elif ACTIVATION == "gelu_tanh":
        inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        y = 0.5 * x * (1.0 + (2.0 * tl.sigmoid(2.0 * inner) - 1.0))
    elif ACTIVATION == "gelu":
        y = 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
    elif ACTIVATION == "relu":
        y = tl.maximum(x, 0.0)
    else:  # relu2
        y = tl.maximum(x, 0.0)
        y = y * y
    return y


@triton.jit
def _activation_kernel(h_ptr, out_ptr, n_rows, n_cols, in_stride, ACTIVATION: tl.constexpr, GATED: tl.constexpr,
                       BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    inside = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    # gated input rows are [gate; up], 2·n_cols wide
    in_offsets = rows.to(tl.int64)[:, None] * in_stride + cols[None, :]
    y = activate(tl.load(h_ptr + in_offsets, mask=inside, other=0.0).to(tl.float32), ACTIVATION)
    if GATED:
        y = y * tl.load(h_ptr + in_offsets + n_cols, mask=inside, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * n_cols + cols[None, :], y.to(out_ptr.dtype.element_ty),
             mask=inside)


def activation(h: torch.Tensor, mlp: MLP) -> torch.Tensor:
    """act(gate) · up for h = [gate; up] when gated, else act(h), over the last dim."""
    h = h.contiguous()
    n_cols = h.shape[-1] // 2 if mlp.gated else h.shape[-1]
    n_rows = h.numel() // h.shape[-1]
    out = torch.empty((*h.shape[:-1], n_cols), dtype=h.dtype, device=h.device)
    block_cols = min(triton.next_power_of_2(n_cols), 1024)
    block_rows = max(1, min(triton.next_power_of_2(n_rows), TILE // block_cols))
    grid = (triton.cdiv(n_rows, block_rows), triton.cdiv(n_cols, block_cols))
    _activation_kernel[grid](h, out, n_rows, n_cols, h.shape[-1], ACTIVATION=mlp.activation, GATED=mlp.gated,
                             BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols, num_warps=warps(block_rows * block_cols))
    return out
