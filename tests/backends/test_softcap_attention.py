"""Attention-logit softcapping (`Attention.softcap`, Gemma 2): the reference op against transformers' formula in
float64, then the Triton kernel (prefill and split-KV decode, under the interpreter here) and the MLX op against
the reference op, over padded batches with grouped heads and ALiBi. The compiled CPU kernel's softcap is tested
in test_cpu_fused.py."""

from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest
import torch

from polylm_mlx import ops as mlx_ops
from test_triton_kernels import (DTYPES, REFERENCE, TRITON, attention_inputs, check_attention, padded_mask,
                                 triton_attention)

#: small enough to bite: the scaled scores of these random inputs reach about ±4
SOFTCAP = 1.5
CASES = [(4, 2, 64, "rope"), (2, 2, 96, "alibi")]  # heads, kv_heads, head_dim, position


def capped_inputs(heads, kv_heads, head_dim, position, mask, past, dtype, capacity=None):
    attn, step, q, keys, values = attention_inputs(heads, kv_heads, head_dim, position, mask, past, dtype, capacity)
    return replace(attn, softcap=SOFTCAP), step, q * 2, keys, values


def formula(q, keys, values, bias, attn):
    """transformers' eager attention with a softcap, in float64: [batch, new, heads·d]."""
    group = attn.num_heads // attn.num_kv_heads
    keys, values = (t[:, :, :bias.shape[-1]].double().repeat_interleave(group, 1) for t in (keys, values))
    scores = q.double() @ keys.transpose(-1, -2) * attn.softmax_scale
    scores = attn.softcap * torch.tanh(scores / attn.softcap) + bias.double()
    out = torch.softmax(scores, dim=-1) @ values
    return out.transpose(1, 2).flatten(2)


@pytest.mark.parametrize("heads,kv_heads,head_dim,position", CASES)
def test_reference_op_is_transformers_formula(heads, kv_heads, head_dim, position):
    mask = padded_mask([9, 5], 11, ["left", "right"])
    attn, step, q, keys, values = capped_inputs(heads, kv_heads, head_dim, position, mask, 4, torch.float32)
    got = REFERENCE.attention(q, keys, values, step, attn)
    expected = formula(q, keys, values, step.attention_bias, attn)
    assert (got.double() - expected).abs().max().item() <= 1e-5
    uncapped = REFERENCE.attention(q, keys, values, step, replace(attn, softcap=None))
    assert (got - uncapped).abs().max().item() > 0.05  # the cap changes the outputs


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,head_dim,position", CASES)
def test_triton_prefill(dtype, heads, kv_heads, head_dim, position):
    mask = np.concatenate([padded_mask([9, 5], 11, ["left", "right"]), np.zeros((1, 11), dtype=bool)])
    attn, step, q, keys, values = capped_inputs(heads, kv_heads, head_dim, position, mask, 0, dtype)
    got = TRITON.attention(q, keys, values, step, attn)
    check_attention(got, REFERENCE.attention(q, keys, values, step, attn), mask, 0, dtype)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_triton_split_kv_decode(num_splits):
    mask = padded_mask([150, 97], 150, ["left", "left"])
    attn, step, q, keys, values = capped_inputs(4, 2, 64, "rope", mask, 149, torch.float32, capacity=160)
    got = triton_attention(q, keys, values, step.mask, step.positions, step.slots, step.alibi, attn,
                           num_splits=num_splits)
    check_attention(got, REFERENCE.attention(q, keys, values, step, attn), mask, 149, torch.float32)


@pytest.mark.parametrize("heads,kv_heads,head_dim,position", CASES)
@pytest.mark.parametrize("past", [0, 10])
def test_mlx_op(heads, kv_heads, head_dim, position, past):
    mask = padded_mask([9, 5], 11, ["left", "right"])
    attn, step, q, keys, values = capped_inputs(heads, kv_heads, head_dim, position, mask, past, torch.float32)
    expected = REFERENCE.attention(q, keys, values, step, attn)
    as_mx = lambda t: mx.array(t.cpu().numpy())  # noqa: E731
    got = mlx_ops.attention(as_mx(q), as_mx(keys[:, :, :11]), as_mx(values[:, :, :11]), as_mx(step.attention_bias),
                            attn)
    got = np.array(got).transpose(0, 2, 1, 3).reshape(expected.shape)
    assert np.abs(got - expected.numpy()).max() <= 1e-5
