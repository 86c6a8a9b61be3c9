"""Pinned launch configurations: block sizes and warps chosen from the shapes alone, never autotuned
(the interpreter would benchmark every candidate, and a captured CUDA graph needs fixed launches)."""

from __future__ import annotations

import triton

#: elements one program of an elementwise or row-wise kernel handles
TILE = 4096


def row_tile(n_rows: int, n_cols: int) -> tuple[int, int, int]:
    """(BLOCK_ROWS, BLOCK_COLS, num_warps) for a kernel that needs whole rows of `n_cols` in one program."""
    block_cols = triton.next_power_of_2(n_cols)
    block_rows = max(1, min(triton.next_power_of_2(n_rows), TILE // block_cols))
    return block_rows, block_cols, warps(block_rows * block_cols)


def warps(elements: int) -> int:
    """Warps for a tile of `elements`: about 16 elements per thread, 1 to 16 warps."""
    return max(1, min(16, elements // 512))
