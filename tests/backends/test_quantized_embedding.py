"""The embedding table quantized by `Quantization.embedding` (int8, one scale per row, for both presets) on every
backend: a tied head multiplies with the table's codes and scales, and the lookup dequantizes the ids' rows
exactly (`dequantize()[ids]` in the compute dtype)."""

import warnings

import mlx.core as mx
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import polylm
from polylm.errors import IRError
from polylm.ir import QUANTIZATIONS, Quantization
from polylm_mlx import ops as mlx_ops
from polylm_mlx.quantize import QuantizedMatrix
from polylm_triton.quantized import QuantizedWeight

#: |head(x) − F.linear(x, dequantized head)| over 3 rows of x ~ N(0, 1): only the order of float32 sums differs
HEAD_EXACT = 1e-4


def test_presets_quantize_the_table_at_int8():
    assert QUANTIZATIONS["int8"].embedding == QUANTIZATIONS["int4"].embedding == Quantization(8)
    assert Quantization(4, 64, embedding_bits=4).embedding == Quantization(4, 64)
    assert Quantization(8).embedding is None
    with pytest.raises(IRError, match="embedding quantization bits"):
        Quantization(8, embedding_bits=6)


def tied_model(make_ckpt, backend, quantize):
    model = polylm.load(make_ckpt("gemma"), backend=backend, dtype="float32", quantize=quantize)
    assert model.ir.head.tied_to_embedding
    return model, model.runtime.params


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_torch_tied_head_and_rows(make_ckpt, quantize):
    model, params = tied_model(make_ckpt, "torch", quantize)
    assert params.head is params.embed
    dense = params.head.dequantize()
    x = torch.randn(3, dense.shape[1], generator=torch.Generator().manual_seed(0))
    assert (params.head(x) - F.linear(x, dense)).abs().max() <= HEAD_EXACT
    ids = torch.tensor([[0, 7], [model.ir.embedding.vocab_size - 1, 7]])
    assert torch.equal(params.embed.rows(ids), dense[ids])


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_mlx_tied_head_and_rows(make_ckpt, quantize):
    model, params = tied_model(make_ckpt, "mlx", quantize)
    assert isinstance(params.embed, QuantizedMatrix) and params.head is params.embed and params.embed.bits == 8
    dense = np.asarray(params.head.dequantize())
    x = np.random.default_rng(0).standard_normal((3, dense.shape[1])).astype(np.float32)
    assert np.abs(np.asarray(params.head.matmul(mx.array(x))) - x @ dense.T).max() <= HEAD_EXACT
    ids = np.array([[0, 7], [model.ir.embedding.vocab_size - 1, 7]])
    rows = mlx_ops.embed_rows(mx.array(ids), params.embed, mx.float32, None, None)
    assert np.array_equal(np.asarray(rows), dense[ids])


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_triton_tied_head_and_rows(make_ckpt, quantize):
    model, params = tied_model(make_ckpt, "triton", quantize)
    assert isinstance(params.embed, QuantizedWeight) and params.head is params.embed and params.embed.bits == 8
    ops, dense = model.runtime.ops, params.head.dequantize()
    x = torch.randn(3, dense.shape[1], generator=torch.Generator().manual_seed(0))
    assert (ops.linear(x, params.head) - F.linear(x, dense)).abs().max() <= HEAD_EXACT
    ids = torch.tensor([[0, 7], [model.ir.embedding.vocab_size - 1, 7]])
    assert torch.equal(ops.embed(ids, params.embed, 1.0, None), dense[ids])


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("bits", [8, 4])
def test_torch_quantized_rows_are_the_dequantized_rows(monkeypatch, compiled, bits):
    """`rows` reads the packed layout (or, without the extension, the plain codes) exactly, any ids shape."""
    from polylm_torch.cpu_gemv import Int4Linear, Int8Linear, _build

    if not compiled:
        monkeypatch.setattr(_build, "select_isa", lambda: (None, None, "forced by the test"))
    weight = torch.randn(37, 72, generator=torch.Generator().manual_seed(0)).bfloat16()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer = Int8Linear.from_float(weight) if bits == 8 else Int4Linear.from_float(weight, group_size=32)
    assert (layer.isa == "torch") != compiled
    ids = torch.tensor([[0, 5, 36], [17, 16, 15]])
    rows = layer.rows(ids)
    assert rows.dtype == torch.bfloat16 and torch.equal(rows, layer.dequantize()[ids].bfloat16())
