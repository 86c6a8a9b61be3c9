"""Weight-only int8/int4 projections: the quantized weight record `TritonOps.linear` dispatches on, and the
Triton matmul that reads it (integers dequantized in registers, float32 accumulation).

The scheme is the IR's (`polylm.ir.Quantization`): symmetric, one scale per `group_size` consecutive input
features (per output row without a group size). The codes q and scales come from the core reference
(`polylm.numerics.quantization`) and are only packed here: int8 codes as they are, int4 as two codes q + 8 per
byte, the even input feature in the low nibble; scales in the scheme's scale dtype (float32 for int8, bfloat16
for int4) whatever the compute dtype. The weight multiplied with is exactly scale · q.

One kernel serves every shape. Up to `SMALL_ROWS` rows (decode) a program multiplies its few rows by a weight
tile with a broadcast product and a row sum, reading each weight byte once for all rows; more rows (prefill)
go through `tl.dot` on tiles of 16–64 rows. With one scale per output row the integers are multiplied unscaled
and the scale applied once at the end; when a tile of input features lies inside one group (prefill tiles are
sized to), once per tile — either way the dot's operands stay integers, exact in 16 bits. A tile spanning
several groups (decode tiles, or group sizes without a power-of-two factor ≥ 16) scales each weight as it is
loaded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from polylm.ir import ModelIR, Quantization
from polylm.numerics import quantization
from polylm_torch_common.params import ModelParams

#: Up to this many rows of x, the broadcast-and-sum path; above it, `tl.dot` tiles.
SMALL_ROWS = 4

# how a program applies the scales (SCALE_MODE)
_PER_ROW, _PER_TILE, _PER_WEIGHT = 0, 1, 2


@dataclass
class QuantizedWeight:
    """A [out, in] projection quantized symmetrically, as `TritonOps.linear` reads it; or a stack of them
    [experts, out, in] (`experts`), every array with the experts first."""

    data: torch.Tensor  # int8 [out, in]; int4: uint8 [out, ⌈in / 2⌉], codes q + 8, even feature in the low nibble
    scales: torch.Tensor  # [out, ⌈in / group_size⌉] (one column without a group size), in the scale dtype
    bits: int
    group_size: int | None
    in_features: int
    dtype: torch.dtype = torch.float32  # the dense weight's: what `rows` returns

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.data.shape[:-1], self.in_features)

    def dequantize(self) -> torch.Tensor:
        """The [(experts,) out, in] float32 weight the kernel multiplies with: scale · q."""
        if self.bits == 8:
            q = self.data.float()
        else:
            q = torch.stack((self.data & 0xF, self.data >> 4), dim=-1).flatten(-2)[..., :self.in_features].float() - 8
        group = self.group_size or self.in_features
        return q * self.scales.float().repeat_interleave(group, dim=-1)[..., :self.in_features]

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """`dequantize()[ids]` in `dtype`, dequantizing only those rows (an embedding table's lookup)."""
        picked = QuantizedWeight(self.data[ids], self.scales[ids], self.bits, self.group_size, self.in_features)
        return picked.dequantize().to(self.dtype)


def quantize(weight: torch.Tensor, spec: Quantization) -> QuantizedWeight:
    """`weight` [out, in] quantized by the core reference and packed for the kernel, on its device."""
    reference = quantization.quantize(weight.detach().float().cpu().numpy(), spec)
    codes = torch.from_numpy(reference.codes)
    if spec.bits == 4:  # q + 8, two a byte (an odd last feature pairs with q = 0)
        codes = F.pad((codes + 8).to(torch.uint8), (0, codes.shape[1] % 2), value=8)
        codes = codes[:, 0::2] | (codes[:, 1::2] << 4)
    scales = torch.from_numpy(reference.scales).to(getattr(torch, spec.scale_dtype))
    return QuantizedWeight(codes.contiguous().to(weight.device), scales.to(weight.device), spec.bits,
                           spec.group_size, weight.shape[1], weight.dtype)


def quantize_params(params: ModelParams, ir: ModelIR) -> None:
    """Replace the block matrices (experts' included, a list over the experts as the torch runtime builds them),
    an untied head and, when the scheme quantizes it, the embedding table (a tied head with it) of the torch
    runtime's dense `params` by `QuantizedWeight`s as `ir.quantization` says, in place and one matrix at a time
    (each dense one is freed as it goes)."""
    spec = ir.quantization
    assert spec is not None
    for layer in params.layers:
        for name in ("qkv", "out", "up", "down"):  # a mixture-of-experts layer has no dense up and down
            if getattr(layer, name) is not None:
                setattr(layer, name, quantize(getattr(layer, name), spec))
        moe = layer.moe
        if moe is not None:  # every expert's matrices and the shared expert's; the router and gates stay
            for name in ("experts_up", "experts_down"):
                matrices = getattr(moe, name)
                for e, matrix in enumerate(matrices):
                    matrices[e] = quantize(matrix, spec)
            for name in ("shared_up", "shared_down"):
                if getattr(moe, name) is not None:
                    setattr(moe, name, quantize(getattr(moe, name), spec))
    if not ir.head.tied_to_embedding:
        params.head = quantize(params.head, spec)
    if spec.embedding is not None:  # the table by its own scheme (a tied head is the same record)
        params.embed = quantize(params.embed, spec.embedding)
        if ir.head.tied_to_embedding:
            params.head = params.embed


def matmul_tiles(rows: int, group_size: int | None, exact: bool = False) -> dict:
    """The pinned launch configuration for `rows` rows of x (shapes only, never autotuned); `exact`: float32
    activations, whose dot runs without tensor cores and gets smaller tiles."""
    mode = _PER_ROW
    if rows <= SMALL_ROWS:  # ~4096 products per tile; a tile of more than one group scales each weight
        block_m = triton.next_power_of_2(rows)
        block_k = 128 // block_m
        if group_size is not None:
            mode = _PER_TILE if group_size % block_k == 0 else _PER_WEIGHT
        return dict(BLOCK_M=block_m, BLOCK_N=4096 // (block_m * block_k), BLOCK_K=block_k, SCALE_MODE=mode,
                    USE_DOT=False, num_warps=8)
    # a dot wants ≥ 16 features; a tile inside one group keeps its weight operand integers
    block_m, block_n, block_k = (16 if rows <= 16 else 32 if rows <= 32 else 64), 64, 64
    if exact:
        block_m, block_n = min(block_m, 32), 32
    if group_size is not None:
        fit = min(block_k, group_size & -group_size)  # the largest power of two dividing the group, capped
        block_k, mode = (fit, _PER_TILE) if fit >= 16 else (block_k, _PER_WEIGHT)
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SCALE_MODE=mode, USE_DOT=True, num_warps=4)


@triton.jit
def weight_tile(w_rows, s_rows, k0, K, col_in, group_size, BITS: tl.constexpr, SCALE_MODE: tl.constexpr,
                BLOCK_K: tl.constexpr):
    """The weights [BLOCK_N, BLOCK_K] of the rows at `w_rows` (their scales at `s_rows`) for input features
    k0…: the integers q as float32, scaled already where each weight has its own scale (SCALE_MODE 2)."""
    k = k0 + tl.arange(0, BLOCK_K)
    k_in = k < K
    if BITS == 8:
        q = tl.load(w_rows + k[None, :], mask=col_in[:, None] & k_in[None, :], other=0).to(tl.float32)
    else:
        byte = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        packed = tl.load(w_rows + byte[None, :], mask=col_in[:, None] & (2 * byte < K)[None, :], other=0x88)
        q = tl.interleave((packed & 0xF).to(tl.float32), (packed >> 4).to(tl.float32)) - 8.0
    if SCALE_MODE == 2:
        scale = tl.load(s_rows[:, None] + (k // group_size)[None, :], mask=col_in[:, None] & k_in[None, :],
                        other=0.0)
        q = q * scale.to(tl.float32)
    return q


@triton.jit
def accumulate(acc, x, w, s_rows, k0, group_size, col_in, SCALE_MODE: tl.constexpr, USE_DOT: tl.constexpr,
               EXACT: tl.constexpr):
    """acc [BLOCK_M, BLOCK_N] + x [BLOCK_M, BLOCK_K] @ wᵀ (w [BLOCK_N, BLOCK_K]), the tile's scale applied when
    it lies inside one group (SCALE_MODE 1)."""
    if USE_DOT:
        if EXACT:
            part = tl.dot(x, tl.trans(w), input_precision="ieee")
        else:  # integers are exact in 16 bits; a weight scaled here is rounded to x's dtype
            part = tl.dot(x, tl.trans(w.to(x.dtype)))
    else:
        part = tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
    if SCALE_MODE == 1:  # the tile lies inside one group
        acc += part * tl.load(s_rows + k0 // group_size, mask=col_in, other=0.0).to(tl.float32)[None, :]
    else:
        acc += part
    return acc


@triton.jit
def _quantized_matmul_kernel(x_ptr, w_ptr, scales_ptr, bias_ptr, y_ptr, M, N, K, group_size,
                             stride_xm, stride_wn, stride_sn, stride_ym,
                             BITS: tl.constexpr, SCALE_MODE: tl.constexpr, HAS_BIAS: tl.constexpr,
                             USE_DOT: tl.constexpr, EXACT: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_in, col_in = rows < M, cols < N
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_wn
    s_rows = scales_ptr + cols.to(tl.int64) * stride_sn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_rows + k[None, :], mask=row_in[:, None] & (k < K)[None, :], other=0.0)
        w = weight_tile(w_rows, s_rows, k0, K, col_in, group_size, BITS, SCALE_MODE, BLOCK_K)
        acc = accumulate(acc, x, w, s_rows, k0, group_size, col_in, SCALE_MODE, USE_DOT, EXACT)
    if SCALE_MODE == 0:
        acc = acc * tl.load(s_rows, mask=col_in, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_in, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows.to(tl.int64)[:, None] * stride_ym + cols[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=row_in[:, None] & col_in[None, :])


def linear(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] @ weightᵀ (+ bias) → [..., out] in x's dtype."""
    out_features, in_features = weight.shape
    x2 = x.reshape(-1, in_features)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    y = torch.empty((rows, out_features), dtype=x.dtype, device=x.device)
    if rows:
        tiles = matmul_tiles(rows, weight.group_size, x.dtype == torch.float32)
        grid = (triton.cdiv(out_features, tiles["BLOCK_N"]), triton.cdiv(rows, tiles["BLOCK_M"]))
        _quantized_matmul_kernel[grid](
            x2, weight.data, weight.scales, bias if bias is not None else weight.scales, y, rows, out_features,
            in_features, weight.group_size or in_features, x2.stride(0), weight.data.stride(0),
            weight.scales.stride(0), y.stride(0), BITS=weight.bits, HAS_BIAS=bias is not None,
            EXACT=x.dtype == torch.float32, **tiles)
    return y.view(*x.shape[:-1], out_features)
