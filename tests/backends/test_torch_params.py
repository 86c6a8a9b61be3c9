"""The torch backend's params: every matrix becomes its kernel layer as it is read, and an embedding tied to the
head is stored once, as the head's packed layer."""

import pytest
import torch

import polylm
from polylm_torch.cpu_gemv import Int4Linear, Int8Linear, PackedLinear


@pytest.mark.parametrize("quantize", [None, "int8", "int4"])
@pytest.mark.parametrize("tied", [True, False])
def test_tied_embedding_is_the_packed_head(make_ckpt, tied, quantize):
    model = polylm.load(make_ckpt("gemma", tie_word_embeddings=tied), backend="torch", quantize=quantize)
    runtime, params = model.runtime, model.runtime.params
    assert model.ir.head.tied_to_embedding == tied
    assert all(not isinstance(matrix, torch.Tensor)
               for layer in params.layers for matrix in (layer.qkv, layer.out, layer.up, layer.down))
    assert not isinstance(params.head, torch.Tensor) and params.head_bias is None
    ids = torch.tensor([[0, 5, model.ir.embedding.vocab_size - 1]])
    looked_up = runtime.ops.embed(ids, params.embed, runtime.embed_scale, None)
    if quantize is None:
        if not tied:
            assert isinstance(params.embed, torch.Tensor)
            return
        # no plain [vocab, hidden] tensor is left: the lookup reads the head's packed copy, exactly
        assert params.embed is params.head and isinstance(params.head, PackedLinear)
        assert torch.equal(looked_up, runtime.ops.embed(ids, params.head.weight, runtime.embed_scale, None))
        return
    # the presets store the table (a tied head) as int8 with one scale per row: the lookup dequantizes its rows
    assert isinstance(params.embed, Int8Linear) and params.embed.group_size == 64  # hidden 64: one group a row
    assert (params.embed is params.head) == tied and isinstance(params.head, Int8Linear if tied or quantize == "int8"
                                                                else Int4Linear)
    dequantized = params.embed.dequantize().to(runtime.torch_dtype)
    assert torch.equal(looked_up, runtime.ops.embed(ids, dequantized, runtime.embed_scale, None))
