"""The head's row gather as a Triton kernel: one token per batch row (the last one after a prefill, the last
real one for sequence classification) before the head's matmul, so logits are computed only where needed."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .config import warps


@triton.jit
def _gather_kernel(x_ptr, index_ptr, out_ptr, new, n_cols, BLOCK_COLS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    token = row * new + tl.load(index_ptr + row).to(tl.int64)
    values = tl.load(x_ptr + token * n_cols + cols, mask=cols < n_cols)
    tl.store(out_ptr + row * n_cols + cols, values, mask=cols < n_cols)


def gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [batch, new, hidden] at new-index `index` [batch] → [batch, hidden]."""
    x = x.contiguous()
    batch, new, n_cols = x.shape
    out = torch.empty((batch, n_cols), dtype=x.dtype, device=x.device)
    block_cols = min(triton.next_power_of_2(n_cols), 4096)
    _gather_kernel[(batch, triton.cdiv(n_cols, block_cols))](x, index.contiguous(), out, new, n_cols,
                                                            BLOCK_COLS=block_cols, num_warps=warps(block_cols))
    return out
