"""Weight-only int8/int4 projections for MLX: the IR's symmetric scheme stored in MLX's own affine format.

The codes q and scales come from the core reference (`polylm.numerics.quantization`); this module only packs
them. MLX's affine format stores unsigned codes u with a scale and a bias per group and reads w = scale·u + bias.
With u = q + 2^(bits−1) and bias = −2^(bits−1)·scale that is exactly scale·q, so `mx.quantized_matmul` computes
the symmetric scheme itself; the biases cost one extra scale per group. Scales (and biases) keep the scheme's
scale dtype (float32 for int8, bfloat16 for int4) whatever the activations' dtype; the product is cast back to
the activations' dtype.

MLX groups 32, 64 or 128 input features. IR groups that are multiples of 32 map onto those by repeating each
group's scale; one scale per output row (int8's default) likewise becomes that scale repeated over every group
of the row — both exact. Input features are zero-padded to whole groups (q = 0 there); the activations are then
padded to match, which real checkpoints never need. A stack of matrices (a mixture-of-experts layer's experts,
[experts, out, in]) is quantized row by row like one matrix and multiplied through `mx.gather_qmm`. A checkpoint
stored in this format (mlx-lm's affine codes, scales and biases) is held in the same record as it is (`params`).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from polylm.errors import BackendError
from polylm.ir import Quantization
from polylm.numerics import quantization

#: the group sizes `mx.quantize` supports, largest (fewest scales to read) first
MLX_GROUP_SIZES = (128, 64, 32)


@dataclass
class QuantizedMatrix:
    """A [out, in] projection (or a stack of them, [experts, out, in]) in MLX's affine quantized layout, the
    operand of `x @ w.T`."""

    # polylm's: codes q + 2^(bits−1) (biases −2^(bits−1) · scales); a checkpoint's: as stored (see `params`)
    weight: mx.array  # uint32 [..., out, padded_in · bits / 32], packed from the low bits up
    scales: mx.array  # [..., out, padded_in / group_size] in the scheme's scale dtype
    biases: mx.array  # −2^(bits−1) · scales
    group_size: int  # MLX's group size
    bits: int
    in_features: int  # before padding

    def matmul(self, x: mx.array) -> mx.array:
        """x [..., in] @ w.T in x's dtype."""
        y = mx.quantized_matmul(self._padded(x), self.weight, self.scales, self.biases, transpose=True,
                                group_size=self.group_size, bits=self.bits)
        return y.astype(x.dtype)  # float32 scales promote a bfloat16 or float16 product

    def gather_matmul(self, x: mx.array, indices: mx.array, sorted_indices: bool) -> mx.array:
        """x [..., rows, in] @ w[indices].T of a stack, in x's dtype (see `ops.gather_linear`)."""
        y = mx.gather_qmm(self._padded(x), self.weight, self.scales, self.biases, rhs_indices=indices,
                          transpose=True, group_size=self.group_size, bits=self.bits, sorted_indices=sorted_indices)
        return y.astype(x.dtype)

    def _padded(self, x: mx.array) -> mx.array:
        padding = self.scales.shape[-1] * self.group_size - self.in_features
        return mx.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, padding)]) if padding else x

    def dequantize_stored(self) -> mx.array:
        """The [out, in] weight of a matrix stored MLX-quantized, as `mx.dequantize` gives it (scales' dtype)."""
        return mx.dequantize(self.weight, self.scales, self.biases, group_size=self.group_size, bits=self.bits)

    def take_rows(self, rows: mx.array) -> QuantizedMatrix:
        """The matrix of output rows `rows` (rows are quantized independently)."""
        return QuantizedMatrix(self.weight[rows], self.scales[rows], self.biases[rows], self.group_size, self.bits,
                               self.in_features)

    @staticmethod
    def concatenate(parts: list[QuantizedMatrix]) -> QuantizedMatrix:
        """The row-wise concatenation of matrices of one bits, group size and input size."""
        return QuantizedMatrix(*(mx.concatenate([getattr(part, name) for part in parts], axis=0)
                                 for name in ("weight", "scales", "biases")),
                               parts[0].group_size, parts[0].bits, parts[0].in_features)

    def dequantize(self) -> mx.array:
        """The [..., out, in] float32 weight this matrix multiplies with (scale · q)."""
        ones = mx.ones(self.scales.shape, dtype=mx.float32)
        q = mx.dequantize(self.weight, ones, ones * -2 ** (self.bits - 1), group_size=self.group_size, bits=self.bits)
        scales = mx.repeat(self.scales.astype(mx.float32), self.group_size, axis=-1)
        return (q * scales)[..., :self.in_features]


def quantize(stored: mx.array, spec: Quantization, where: str) -> QuantizedMatrix:
    """`stored` [..., out, in] quantized by the core reference and packed for `mx.quantized_matmul` (or, stacked,
    `mx.gather_qmm`); `where` names it in errors."""
    *lead, in_features = stored.shape
    # the IR's group, as a width over the (padded) input features
    if spec.group_size is None:
        ir_group = -(-in_features // 32) * 32
    elif spec.group_size % 32 == 0:
        ir_group = spec.group_size
    else:
        raise BackendError(f"{where}: MLX quantizes groups of {', '.join(map(str, sorted(MLX_GROUP_SIZES)))} input "
                           f"features; int{spec.bits} with groups of {spec.group_size} is not a multiple of 32")
    group_size = next(size for size in MLX_GROUP_SIZES if ir_group % size == 0)
    padded = -(-in_features // ir_group) * ir_group
    # rows are quantized independently, so a stack's rows are quantized as one matrix's
    reference = quantization.quantize(np.asarray(stored.astype(mx.float32)).reshape(-1, in_features), spec)
    offset = 2 ** (spec.bits - 1)
    codes = np.pad(reference.codes, ((0, 0), (0, padded - in_features))).view(np.uint8) + np.uint8(offset)
    if spec.bits == 4:  # two codes a byte, the even feature in the low nibble
        codes = codes[:, 0::2] | (codes[:, 1::2] << 4)
    packed = mx.array(codes.view(np.uint32)).reshape(*lead, -1)  # little-endian: the first code in the lowest bits
    scales = mx.array(reference.scales).astype(getattr(mx, spec.scale_dtype)).reshape(*lead, -1)
    scales = mx.repeat(scales, ir_group // group_size, axis=-1)
    return QuantizedMatrix(packed, scales, scales * -offset, group_size, spec.bits, in_features)
