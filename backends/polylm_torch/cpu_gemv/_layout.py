"""The 16-row block layout of the compiled kernels, in plain torch.

A packed weight is cut into blocks of 16 output rows (rows padded with zeros to a multiple of 16). Each block
is one contiguous run of 64-byte chunks; chunk ``c`` holds 4 bytes of every row of the block, in row order:

- bf16: the pair ``(k=2c, k=2c+1)`` of each row (a 32-bit lane per row, split by shift/mask in the kernel);
- fp16: ``k=2c`` for rows 0..15, then ``k=2c+1`` for rows 0..15 (so ``vcvtph2ps`` yields a vector of rows);
- fp32: ``k=c`` of each row;
- int8: ``k=4c..4c+3`` of each row, stored as ``q + 128`` (unsigned, as ``vpdpbusd`` wants it);
- int4: ``k=8c..8c+7`` of each row, byte ``i`` = ``u[8c+i] | u[8c+4+i] << 4`` with ``u = q + 8`` in 0..15.

Group scales are stored ``[block, group, 16 rows]``. The functions here are the single definition of that layout
(the C++ side only reads it); the codes and scales they pack come from `polylm.numerics.quantization`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ROWS_PER_BLOCK = 16
# Group sizes must be a multiple of this (the activation preparation works in 16-lane steps).
GROUP_MULTIPLE = 16
# Largest group: the kernels' exact int32 dot products per group stay below 2^31 (group * 255 * 128).
MAX_GROUP = 65536


def round_up(value: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` that is >= ``value``."""
    return (value + multiple - 1) // multiple * multiple


def _pad(t: torch.Tensor, rows: int, cols: int, value: float = 0.0) -> torch.Tensor:
    """`t` padded to [rows, cols] with `value`; `t` itself when it has that shape (no copy)."""
    if (rows, cols) == tuple(t.shape):
        return t
    return F.pad(t, (0, cols - t.shape[1], 0, rows - t.shape[0]), value=value)


def _blocked(t: torch.Tensor) -> torch.Tensor:
    """[N_pad, ...] -> [N_pad / 16, 16, ...]."""
    return t.reshape(t.shape[0] // ROWS_PER_BLOCK, ROWS_PER_BLOCK, *t.shape[1:])


# ---------------------------------------------------------------------------------------------- float weights
def float_chunk_k(dtype: torch.dtype) -> int:
    """k-values per 64-byte chunk row: 1 for fp32, 2 for bf16/fp16."""
    return 1 if dtype == torch.float32 else 2


def pack_float(weight: torch.Tensor) -> torch.Tensor:
    """Repack an [N, K] bf16/fp16/fp32 weight into [N_pad/16, chunks, 64 bytes] of the same dtype."""
    n, k = weight.shape
    kk = float_chunk_k(weight.dtype)
    w = _pad(weight, round_up(n, ROWS_PER_BLOCK), round_up(k, kk)).contiguous()
    if weight.dtype != torch.float16:
        return _block_words(w)
    w = _blocked(w).reshape(-1, ROWS_PER_BLOCK, w.shape[1] // kk, kk).permute(0, 2, 3, 1).contiguous()
    return w.reshape(w.shape[0], w.shape[1], ROWS_PER_BLOCK * kk)


def _block_words(rows: torch.Tensor) -> torch.Tensor:
    """[N_pad, W 32-bit words] of any dtype -> [N_pad/16, W, 64 bytes as that dtype]: chunk w of a block holds
    word w of its 16 rows. One transpose of 4-byte words (a bf16 pair, an fp32 value, 4 int8 or 8 int4 values),
    about 5x faster at load than permuting the narrower values."""
    words = _blocked(rows.contiguous().view(torch.int32)).transpose(1, 2).contiguous()
    return words.view(rows.dtype)


def _row_lanes(packed: torch.Tensor) -> torch.Tensor:
    """A :func:`pack_float` weight viewed as [N_pad/16, chunks, 16 rows, k-values per chunk] (no copy)."""
    kk = float_chunk_k(packed.dtype)
    nb, chunks = packed.shape[:2]
    if packed.dtype == torch.float16:
        return packed.view(nb, chunks, kk, ROWS_PER_BLOCK).transpose(2, 3)
    return packed.view(nb, chunks, ROWS_PER_BLOCK, kk)


def gather_rows(packed: torch.Tensor, k: int, rows: torch.Tensor) -> torch.Tensor:
    """Rows ``rows`` (an integer tensor of any shape) of a :func:`pack_float` weight with K = ``k``, as
    ``weight[rows]`` gives them: [*rows.shape, k], read from the packed copy alone."""
    flat = rows.reshape(-1)
    picked = _row_lanes(packed)[flat // ROWS_PER_BLOCK, :, flat % ROWS_PER_BLOCK]  # [len(flat), chunks, kk]
    return picked.reshape(*rows.shape, picked.shape[1] * picked.shape[2])[..., :k]


# ------------------------------------------------------------------------------------------ quantized weights
def check_group(group_size: int) -> None:
    """Raise ValueError unless group_size is a positive multiple of GROUP_MULTIPLE, at most MAX_GROUP."""
    if group_size <= 0 or group_size % GROUP_MULTIPLE or group_size > MAX_GROUP:
        raise ValueError(f"group_size must be a positive multiple of {GROUP_MULTIPLE} up to {MAX_GROUP} "
                         f"(per-channel int8 uses in_features rounded up to 16), got {group_size}")


def int8_group_size(k: int, group_size: int | None) -> int:
    """The group size actually used: per-output-channel (``None``) means one group of K rounded up to 16."""
    return round_up(k, GROUP_MULTIPLE) if group_size is None else group_size


def pack_int8(q: torch.Tensor, group_size: int) -> torch.Tensor:
    """int8 codes [N, K] -> [N_pad/16, K_pad/4, 64] uint8 holding ``q + 128`` (K_pad: multiple of the group)."""
    n, k = q.shape
    u = (_pad(q, round_up(n, ROWS_PER_BLOCK), round_up(k, group_size)).to(torch.int16) + 128).to(torch.uint8)
    return _block_words(u)


def pack_int4(q: torch.Tensor, group_size: int) -> torch.Tensor:
    """int8 codes [N, K] in -8..7 -> [N_pad/16, K_pad/8, 64] uint8 holding ``q + 8``, two per byte (see the module
    docstring)."""
    n, k = q.shape
    u = _pad((q + 8).to(torch.uint8), round_up(n, ROWS_PER_BLOCK), round_up(k, group_size), value=8)
    u = u.reshape(u.shape[0], -1, 2, 4)  # [N_pad, K_pad / 8, low/high nibbles, 4]
    return _block_words((u[:, :, 0] | (u[:, :, 1] << 4)).reshape(u.shape[0], -1))


def gather_quant_rows(codes: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int, k: int,
                      rows: torch.Tensor) -> torch.Tensor:
    """Rows ``rows`` (an integer tensor of any shape) of a :func:`pack_int8` / :func:`pack_int4` weight with its
    :func:`pack_group_params` scales, dequantized to fp32 ``q * scale``: [*rows.shape, k], read from the packed
    copy alone."""
    flat = rows.reshape(-1)
    block, lane = flat // ROWS_PER_BLOCK, flat % ROWS_PER_BLOCK
    picked = codes.view(codes.shape[0], codes.shape[1], ROWS_PER_BLOCK, 4)[block, :, lane]  # [n, words, 4]
    if bits == 8:
        q = picked.to(torch.int16) - 128
    else:  # byte i of a word: k = i in its low nibble, k = 4 + i in its high one
        q = torch.stack((picked & 15, picked >> 4), dim=2).to(torch.int16) - 8
    q = q.reshape(len(flat), -1)
    scale = scales[block, :, lane].float().repeat_interleave(group_size, dim=1)  # [n, K_pad]
    return (q.float() * scale)[:, :k].reshape(*rows.shape, k)


def pack_group_params(params: torch.Tensor) -> torch.Tensor:
    """[N, groups] -> [N_pad/16, groups, 16] (padded rows get zeros)."""
    p = _pad(params, round_up(params.shape[0], ROWS_PER_BLOCK), params.shape[1])
    return _blocked(p).permute(0, 2, 1).contiguous()
