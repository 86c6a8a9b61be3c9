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

    starts = range(0, out_features, step)
    if len(starts) > 1:
        with ThreadPoolExecutor(min(len(starts), os.cpu_count() or 1)) as pool:
            list(pool.map(block, starts))
    elif out_features:
        block(0)
    return QuantizedArrays(codes, scales, group)


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
