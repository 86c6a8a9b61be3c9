"""The torch backend's CPU matrices: repacked for the compiled decode kernel (`cpu_gemv`), or quantized to
weight-only int8/int4 by the core reference (`polylm.numerics.quantization`) when the IR asks for it. Biases move
into the layers."""

from __future__ import annotations

import torch

from polylm.ir import Quantization

from .cpu_gemv import Int4Linear, Int8Linear, PackedLinear


def kernel_layer(weight: torch.Tensor, bias: torch.Tensor | None,
                 quantization: Quantization | None) -> PackedLinear | Int8Linear | Int4Linear:
    """The kernel layer of one matrix (a `params.Prepare`): packed as it is, or quantized as `quantization` says.
    A head tied to the embedding comes with the embedding table's scheme (unquantized without one): its `rows`
    serve the embedding lookup, dequantized in the weight's dtype when quantized."""
    if quantization is None:
        return PackedLinear(weight, bias)
    layer = Int8Linear if quantization.bits == 8 else Int4Linear
    return layer.from_float(weight, bias, group_size=quantization.group_size)
