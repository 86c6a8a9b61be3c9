"""The torch backend's CPU matrices: repacked for the compiled decode kernel (`cpu_gemv`), or quantized to
weight-only int8/int4 when the IR asks for it. Biases move into the layers."""

from __future__ import annotations

import torch

from polylm.ir import Quantization

from .cpu_gemv import Int4Linear, Int8Linear, PackedLinear
from .params import ModelParams

_MATRICES = ("qkv", "out", "up", "down")


def pack_params(params: ModelParams, quantization: Quantization | None) -> None:
    """Replace every block matrix and the head with a kernel layer (in place); a head tied to the embedding
    is packed, never quantized, as every backend does."""
    for layer in params.layers:
        for name in _MATRICES:
            setattr(layer, name, _kernel_layer(getattr(layer, name), getattr(layer, f"{name}_bias"), quantization))
            setattr(layer, f"{name}_bias", None)
    head_quantization = None if params.head is params.embed else quantization
    params.head = _kernel_layer(params.head, params.head_bias, head_quantization)
    params.head_bias = None


def _kernel_layer(weight: torch.Tensor, bias: torch.Tensor | None, quantization: Quantization | None):
    if quantization is None:
        return PackedLinear(weight, bias)
    if quantization.bits == 8:
        return Int8Linear.from_float(weight, bias, group_size=quantization.group_size)
    return Int4Linear.from_float(weight, bias, group_size=quantization.group_size, symmetric=True)
