"""Attention sinks (`Attention.sinks`, gpt-oss: a learned logit per head in the softmax's denominator): the
reference op against transformers' eager formula in float64, then the Triton kernel (prefill and split-KV decode,
under the interpreter here), the CPU ops (which decline their compiled kernel for it) and the MLX op against the
reference op, over padded batches with grouped heads, with and without a softcap."""

from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest
import torch

from polylm_mlx import ops as mlx_ops
from polylm_torch.cpu_ops import CpuOps
from test_triton_kernels import (DTYPES, REFERENCE, TRITON, attention_inputs, check_attention, padded_mask,
                                 triton_attention)

CASES = [(4, 2, 64, "rope", None), (2, 2, 96, "alibi", None), (4, 1, 32, "rope", 1.5)]  # …, position, softcap


def sink_inputs(heads, kv_heads, head_dim, position, softcap, mask, past, dtype, capacity=None):
    attn, step, q, keys, values = attention_inputs(heads, kv_heads, head_dim, position, mask, past, dtype, capacity)
    sinks = torch.linspace(-1.0, 2.0, heads, dtype=dtype)  # about the scores' size: they take a real share
    return replace(attn, sinks=True, softcap=softcap), step, q * 2, keys, values, sinks


def formula(q, keys, values, bias, attn, sinks):
    """transformers' eager gpt-oss attention in float64 (sinks as an extra column, softmax, dropped)."""
    group = attn.num_heads // attn.num_kv_heads
    keys, values = (t[:, :, :bias.shape[-1]].double().repeat_interleave(group, 1) for t in (keys, values))
    scores = q.double() @ keys.transpose(-1, -2) * attn.softmax_scale
    if attn.softcap is not None:
        scores = attn.softcap * torch.tanh(scores / attn.softcap)
    scores = scores + bias.double()
    sink = sinks.double().reshape(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[2], 1)
    combined = torch.cat([scores, sink], dim=-1)
    probs = torch.softmax(combined - combined.max(dim=-1, keepdim=True).values, dim=-1)[..., :-1]
    return (probs @ values).transpose(1, 2).flatten(2)


@pytest.mark.parametrize("heads,kv_heads,head_dim,position,softcap", CASES)
def test_reference_op_is_transformers_formula(heads, kv_heads, head_dim, position, softcap):
    mask = padded_mask([9, 5], 11, ["left", "right"])
    attn, step, q, keys, values, sinks = sink_inputs(heads, kv_heads, head_dim, position, softcap, mask, 4,
                                                     torch.float32)
    got = REFERENCE.attention(q, keys, values, step, attn, sinks)
    assert (got.double() - formula(q, keys, values, step.attention_bias, attn, sinks)).abs().max().item() <= 1e-5
    without = REFERENCE.attention(q, keys, values, step, attn)
    assert (got - without).abs().max().item() > 0.05  # the sinks change the outputs


@pytest.mark.parametrize("past", [0, 10])
@pytest.mark.parametrize("heads,kv_heads,head_dim,position,softcap", CASES)
def test_cpu_ops_decline_to_the_reference(heads, kv_heads, head_dim, position, softcap, past):
    mask = padded_mask([9, 5], 11, ["left", "right"])
    attn, step, q, keys, values, sinks = sink_inputs(heads, kv_heads, head_dim, position, softcap, mask, past,
                                                     torch.float32)
    expected = REFERENCE.attention(q, keys, values, step, attn, sinks)
    assert torch.equal(CpuOps().attention(q, keys, values, step, attn, sinks), expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,head_dim,position,softcap", CASES)
def test_triton_prefill(dtype, heads, kv_heads, head_dim, position, softcap):
    mask = np.concatenate([padded_mask([9, 5], 11, ["left", "right"]), np.zeros((1, 11), dtype=bool)])
    attn, step, q, keys, values, sinks = sink_inputs(heads, kv_heads, head_dim, position, softcap, mask, 0, dtype)
    got = TRITON.attention(q, keys, values, step, attn, sinks)
    check_attention(got, REFERENCE.attention(q, keys, values, step, attn, sinks), mask, 0, dtype)
    assert got[2].abs().max().item() == 0.0  # a row that sees no key: all its weight on the sink


@pytest.mark.parametrize("num_splits", [1, 3])
def test_triton_split_kv_decode(num_splits):
    mask = padded_mask([150, 97], 150, ["left", "left"])
    attn, step, q, keys, values, sinks = sink_inputs(4, 2, 64, "rope", None, mask, 149, torch.float32, capacity=160)
    got = triton_attention(q, keys, values, step.mask, step.positions, step.slots, step.alibi, attn,
                           num_splits=num_splits, sinks=sinks)
    check_attention(got, REFERENCE.attention(q, keys, values, step, attn, sinks), mask, 149, torch.float32)


@pytest.mark.parametrize("heads,kv_heads,head_dim,position,softcap", CASES)
@pytest.mark.parametrize("past", [0, 10])
def test_mlx_op(heads, kv_heads, head_dim, position, softcap, past):
    mask = padded_mask([9, 5], 11, ["left", "right"])
    attn, step, q, keys, values, sinks = sink_inputs(heads, kv_heads, head_dim, position, softcap, mask, past,
                                                     torch.float32)
    expected = REFERENCE.attention(q, keys, values, step, attn, sinks)
    as_mx = lambda t: mx.array(t.cpu().numpy())  # noqa: E731
    got = mlx_ops.attention(as_mx(q), as_mx(keys[:, :, :11]), as_mx(values[:, :, :11]), as_mx(step.attention_bias),
                            attn, as_mx(sinks))
    got = np.array(got).transpose(0, 2, 1, 3).reshape(expected.shape)
    assert np.abs(got - expected.numpy()).max() <= 1e-5
