"""The IR's weight-only quantization scheme (`polylm.ir.Quantization`) in numpy: the reference every backend stores.

Per group of `group_size` consecutive input features (one group per output row without a group size):
scale = max|w| / qmax (qmax 127 for int8, 7 for int4), rounded to the scheme's `scale_dtype` (float32 for int8,
bfloat16 for int4, whatever the compute dtype or backend), then q = clamp(round(w / scale), −qmax, qmax) in
float32 against that stored scale, rounding half to even; an all-zero group has q = 0. The weight every backend
multiplies with is scale · q (as a float32 product). A last group cut short by the input features is quantized as if padded
with zeros (a zero changes no max|w| and becomes q = 0). A backend only packs `codes` and `scales` into its own
layout; it never computes them.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..ir import Quantization

#: values quantized per task of the thread pool (4 MiB of float32: a few of them stay in cache)
_BLOCK_ELEMENTS = 1 << 20


@dataclass(frozen=True)
class QuantizedArrays:
    """One [out, in] matrix quantized: `scales[:, g]` serves input features g·group_size … (g+1)·group_size − 1."""

    codes: np.ndarray  # int8 [out, in] in −qmax..qmax
    scales: np.ndarray  # float32 [out, groups], each value representable in the scheme's scale dtype
    group_size: int  # input features per scale (in_features with one scale per row)

    def dequantize(self) -> np.ndarray:
        """The float32 [out, in] weight scale · q: their product rounded once (exact for int4's bf16 scales)."""
        scales = np.repeat(self.scales, self.group_size, axis=1)[:, :self.codes.shape[1]]
        return self.codes.astype(np.float32) * scales


def quantize(weight: np.ndarray, spec: Quantization) -> QuantizedArrays:
    """`weight` [out, in] (float32, or anything that converts to it exactly) quantized as `spec` says.

    Rows are independent: they are quantized in blocks of about `_BLOCK_ELEMENTS` values on a thread pool (numpy
    releases the GIL), so the temporaries are a few blocks, not the matrix, and every core takes part."""
    weight = np.asarray(weight, dtype=np.float32)
    out_features, in_features = weight.shape
    group = spec.group_size or in_features  # one group per row without a group size
    groups = -(-in_features // group)
    codes = np.empty((out_features, in_features), dtype=np.int8)
    scales = np.empty((out_features, groups), dtype=np.float32)
    step = max(1, _BLOCK_ELEMENTS // max(1, groups * group))

    def block(start: int) -> None:
        rows = slice(start, start + step)
        codes[rows], scales[rows] = _quantize_rows(weight[rows], spec, group, groups)

    _in_blocks(block, range(0, out_features, step))
    return QuantizedArrays(codes, scales, group)


def _in_blocks(block: Callable[[int], None], starts: range) -> None:
    """`block(start)` for each start, on a thread pool when there are several (numpy releases the GIL)."""
    if len(starts) > 1:
        with ThreadPoolExecutor(min(len(starts), os.cpu_count() or 1)) as pool:
            list(pool.map(block, starts))
    elif starts:
        block(starts[0])


def _quantize_rows(weight: np.ndarray, spec: Quantization, group: int, groups: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(codes, scales) of a block of rows, as `quantize` says."""
    rows, in_features = weight.shape
    if groups * group != in_features:
        weight = np.pad(weight, ((0, 0), (0, groups * group - in_features)))
    grouped = weight.reshape(rows, groups, group)
    absmax = np.maximum(grouped.max(axis=-1, initial=0.0), -grouped.min(axis=-1, initial=0.0))
    scales = absmax / np.float32(spec.qmax)
    if spec.scale_dtype == "bfloat16":
        scales = round_to_bfloat16(scales)
    divisor = np.where(scales > 0, scales, np.float32(1.0))  # an all-zero group: q = 0 under any divisor
    q = np.divide(grouped, divisor[..., None])
    np.rint(q, out=q)
    np.clip(q, -spec.qmax, spec.qmax, out=q)
    return q.reshape(rows, groups * group)[:, :in_features], scales


def round_to_bfloat16(values: np.ndarray) -> np.ndarray:
    """float32 `values` rounded to the nearest bfloat16 (ties to even, NaN kept), still as float32: bfloat16 is
    the upper half of a float32, so the rounding is integer arithmetic on the bits."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = (bits + (np.uint32(0x7FFF) + ((bits >> 16) & 1))) & np.uint32(0xFFFF0000)
    return np.where(np.isnan(values), values, rounded.view(np.float32))


# --- MLX's affine group quantization (pre-quantized checkpoints, `polylm convert`) ---------------------------------

#: The bit widths and group sizes MLX's affine scheme has.
AFFINE_BITS = (2, 3, 4, 5, 6, 8)
AFFINE_GROUP_SIZES = (32, 64, 128)


@dataclass(frozen=True)
class AffineQuantization:
    """MLX's affine group quantization of one stored [out, in] matrix, as mlx-lm writes checkpoints: per group of
    `group_size` consecutive input features a scale s and a bias b (in the checkpoint's float dtype), unsigned
    codes u in 0 … 2^bits − 1, and the weight w = s·u + b; the codes packed little-endian into uint32 words, the
    first feature in the lowest bits (a bit stream across words for 3, 5 and 6 bits).

    It describes how a checkpoint stores a tensor (it may differ per layer, or a layer may be left as it is), not
    the model, so it travels with the tensor (`polylm.checkpoint.weights.TensorRef.quantized`) rather than in the
    IR; the IR's `Quantization` is polylm's own symmetric scheme, applied at load."""

    bits: int
    group_size: int

    def __post_init__(self) -> None:
        if self.bits not in AFFINE_BITS or self.group_size not in AFFINE_GROUP_SIZES:
            raise ValueError(f"MLX affine quantization has bits {AFFINE_BITS} and group sizes "
                             f"{AFFINE_GROUP_SIZES}; got {self.bits} bits, groups of {self.group_size}")

    def packed_shape(self, out_features: int, in_features: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """(codes shape, scales/biases shape) of an [out, in] matrix; `in` must be a whole number of groups."""
        return (out_features, in_features * self.bits // 32), (out_features, in_features // self.group_size)


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned codes [rows, in] (each < 2^bits; in · bits a multiple of 32) packed as MLX packs them: uint32
    [rows, in · bits / 32], little-endian bits, the first code lowest."""
    rows, columns = codes.shape
    if bits == 8 or bits == 4 or bits == 2:
        per_word = 32 // bits
        shifts = np.arange(0, 32, bits, dtype=np.uint32)
        words = codes.astype(np.uint32).reshape(rows, columns // per_word, per_word) << shifts
        return np.bitwise_or.reduce(words, axis=-1)
    stream = (codes.astype(np.uint8)[..., None] >> np.arange(bits, dtype=np.uint8)) & 1  # [rows, in, bits]
    return np.packbits(stream.reshape(rows, -1), axis=-1, bitorder="little").view(np.uint32)


def unpack_codes(packed: np.ndarray, bits: int) -> np.ndarray:
    """The inverse of `pack_codes`: uint32 [rows, words] → uint8 codes [rows, words · 32 / bits]."""
    rows = packed.shape[0]
    if bits in (2, 4, 8):  # whole codes per word: shift and mask
        shifts = np.arange(0, 32, bits, dtype=np.uint32)
        codes = (np.asarray(packed, dtype=np.uint32)[..., None] >> shifts) & np.uint32(2 ** bits - 1)
        return codes.astype(np.uint8).reshape(rows, -1)
    stream = np.unpackbits(np.ascontiguousarray(packed, dtype="<u4").view(np.uint8).reshape(rows, -1), axis=-1,
                           bitorder="little")
    weights = (1 << np.arange(bits, dtype=np.uint8))
    return (stream.reshape(rows, -1, bits) * weights).sum(axis=-1, dtype=np.uint8)


def affine_dequantize(packed: np.ndarray, scales: np.ndarray, biases: np.ndarray, spec: AffineQuantization,
                      dtype: str = "float32") -> np.ndarray:
    """The [rows, in] float32 weight s·u + b of MLX-format arrays, computed as `mx.dequantize` does in the scales'
    `dtype` (float32, bfloat16 or float16; `scales`/`biases` given as float32 values of it): the product rounded to
    that dtype, then the sum. Rows are dequantized in blocks on a thread pool, as `quantize` does."""
    rows, columns = packed.shape[0], packed.shape[1] * 32 // spec.bits
    weight = np.empty((rows, columns), dtype=np.float32)
    rounded, step = _ROUNDING[dtype], max(1, _BLOCK_ELEMENTS // max(1, columns))

    def block(start: int) -> None:
        part = slice(start, start + step)
        codes = unpack_codes(packed[part], spec.bits).astype(np.float32)
        grouped = codes.reshape(len(codes), columns // spec.group_size, spec.group_size)
        values = rounded(grouped * scales[part].astype(np.float32)[..., None])
        weight[part] = rounded(values + biases[part].astype(np.float32)[..., None]).reshape(len(codes), columns)

    _in_blocks(block, range(0, rows, step))
    return weight


def affine_quantize(weight: np.ndarray, spec: AffineQuantization, dtype: str = "float32"
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`weight` [out, in] (float32 values of `dtype`) quantized as MLX's CPU `mx.quantize` does: (packed codes
    uint32, scales, biases), the scales and biases float32 values rounded to `dtype` (what MLX stores for a
    weight of that dtype). `in` must be a whole number of groups.

    Per group, in float32: the scale (max − min) / (2^bits − 1) (at least 1e-7), signed towards the edge (min or
    max) of larger magnitude; that edge is then hit exactly (scale = edge / round(edge / scale), bias = edge)
    unless it rounds to code 0 (bias 0); codes u = clamp(round((w − bias) / scale), 0, 2^bits − 1), computed
    against the float32 scale and bias before these are rounded to `dtype`."""
    weight = np.asarray(weight, dtype=np.float32)
    rows, columns = weight.shape
    grouped = weight.reshape(rows, columns // spec.group_size, spec.group_size)
    high, low = grouped.max(axis=-1), grouped.min(axis=-1)
    bins = np.float32(2 ** spec.bits - 1)
    towards_min = np.abs(low) > np.abs(high)
    scale = np.maximum((high - low) / bins, np.float32(1e-7))
    scale = np.where(towards_min, scale, -scale)
    edge = np.where(towards_min, low, high)
    q0 = np.rint(edge / scale)
    hit = q0 != 0
    scale = np.where(hit, edge / np.where(hit, q0, np.float32(1)), scale).astype(np.float32)
    bias = np.where(hit, edge, np.float32(0)).astype(np.float32)
    codes = np.clip(np.rint((grouped - bias[..., None]) / scale[..., None]), 0, bins)
    packed = pack_codes(codes.astype(np.uint8).reshape(rows, columns), spec.bits)
    rounded = _ROUNDING[dtype]
    return packed, rounded(scale), rounded(bias)


def round_to_float16(values: np.ndarray) -> np.ndarray:
    """float32 `values` rounded to the nearest float16, still as float32."""
    return np.asarray(values, dtype=np.float32).astype(np.float16).astype(np.float32)


_ROUNDING = {"float32": lambda values: np.asarray(values, dtype=np.float32), "bfloat16": round_to_bfloat16,
             "float16": round_to_float16}
