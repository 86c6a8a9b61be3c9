"""The compiled fused kernels of the torch CPU path, on each ISA path this CPU runs: the gated activation
act(gate) * up and the decode attention against fp64 references, the residual add + RMSNorm and the RoPE +
cache write against the torch ops they replace."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from polylm.ir import Attention, RoPE
from polylm_torch import cpu_gemv
from polylm_torch.cpu_gemv import _build
from polylm_torch.ops import TorchOps
from test_cpu_gemv import _isas, extension  # noqa: F401 - `extension` is a fixture

ACTIVATIONS = {0: F.silu, 1: lambda x: F.gelu(x, approximate="tanh")}


@pytest.fixture(params=_isas())
def isa(request) -> int:
    """Each kernel path this CPU runs (both on AVX-512 machines), as the extension's ISA code."""
    return _build.ISA_CODES[request.param]


@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 2 * 37), (2, 5, 2 * 4096), (1, 2)])
def test_gated_activation_matches_fp64(extension, isa, act, dtype, shape):
    h = (torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape))) * 4).to(dtype)
    gate, up = h.double().chunk(2, dim=-1)
    ref = ACTIVATIONS[act](gate) * up
    y = extension.gated_activation(h, act, isa)
    assert y.shape == ref.shape and y.dtype == dtype
    # fp32: a few ulp of the largest output (torch's own ops are at 1e-7 too); bf16: one rounding of the output.
    bound = (2e-7 if dtype == torch.float32 else 2.0**-8) * (ref.abs() + ref.abs().max())
    assert ((y.double() - ref).abs() <= bound).all(), (y.double() - ref).abs().max().item()


def test_gated_activation_edges(extension, isa):
    h = torch.tensor([[math.nan, 100.0, -100.0, 0.0, 2.0, 2.0, 2.0, 2.0]])
    y = extension.gated_activation(h, 1, isa)
    assert math.isnan(y[0, 0]) and y[0, 1].item() == 200.0 and abs(y[0, 2].item()) < 1e-30 and y[0, 3].item() == 0.0
    assert extension.gated_activation(torch.empty(0, 8), 0, isa).shape == (0, 4)
    with pytest.raises(RuntimeError, match="even last dimension"):
        extension.gated_activation(torch.randn(2, 5), 0, isa)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden", [37, 1024])
@pytest.mark.parametrize("with_delta", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_add_rms_norm_matches_torch_ops(extension, isa, dtype, hidden, with_delta, with_bias):
    gen = torch.Generator().manual_seed(hidden)
    x, delta = (torch.randn(2, 3, hidden, generator=gen).to(dtype) for _ in range(2))
    weight, bias = torch.randn(hidden, generator=gen), torch.randn(hidden, generator=gen)
    residual, normed = extension.add_rms_norm(x, delta if with_delta else None, weight, bias if with_bias else None,
                                           1e-6, isa)
    expected = x + delta if with_delta else x
    assert torch.equal(residual, expected)  # the same rounding of the sum
    h = expected.float()
    ref = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * weight + (bias if with_bias else 0)
    # fp32: summation order only; bf16: at most one rounding step of the output
    tolerance = 1e-6 if dtype == torch.float32 else 2.0**-8
    assert ((normed.float() - ref).abs() <= tolerance * (ref.abs() + 1)).all(), (normed.float() - ref).abs().max()


def test_add_rms_norm_bad_input(extension, isa):
    with pytest.raises(RuntimeError, match="delta must be contiguous with x's shape"):
        extension.add_rms_norm(torch.randn(2, 8), torch.randn(2, 4), torch.ones(8), None, 1e-6, isa)
    with pytest.raises(RuntimeError, match="weight must be a contiguous fp32 vector of 8"):
        extension.add_rms_norm(torch.randn(2, 8), None, torch.ones(7), None, 1e-6, isa)


# (batch, heads, kv_heads, new, head_dim, length, capacity, bias_heads): MQA decode, GQA with ALiBi-style
# per-head bias and several query rows, MHA with a head_dim that is not a multiple of 16, a single key.
ATTENTION_CASES = [(1, 16, 1, 1, 64, 192, 256, 1), (2, 4, 2, 3, 48, 37, 40, 4), (1, 2, 2, 5, 80, 5, 5, 1),
                   (1, 2, 1, 1, 8, 1, 4, 1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ATTENTION_CASES)
def test_attention_matches_fp64(extension, isa, dtype, case):
    batch, heads, kv_heads, new, d, length, capacity, bias_heads = case
    gen = torch.Generator().manual_seed(length)
    q = torch.randn(batch, heads, new, d, generator=gen).to(dtype)
    keys, values = (torch.randn(batch, kv_heads, capacity, d, generator=gen).to(dtype) for _ in range(2))
    bias = torch.randn(batch, bias_heads, new, length, generator=gen).to(dtype)
    if length > 1:
        bias[..., 0] = torch.finfo(dtype).min  # a masked slot, as the runtime marks them
    y = extension.attention(q, keys, values, bias, length, 0.3, isa)
    ref = F.scaled_dot_product_attention(q.double(), keys[:, :, :length].double(), values[:, :, :length].double(),
                                         attn_mask=bias.double(), scale=0.3, enable_gqa=True)
    ref = ref.transpose(1, 2).reshape(batch, new, heads * d)
    assert y.shape == ref.shape and y.dtype == dtype
    # fp32: summation order; bf16: the output's rounding (values are O(1))
    assert (y.double() - ref).abs().max().item() <= (2e-6 if dtype == torch.float32 else 2.0**-7)


def test_attention_bad_input(extension, isa):
    q, cache, bias = torch.randn(1, 3, 1, 8), torch.randn(1, 2, 4, 8), torch.zeros(1, 1, 1, 4)
    with pytest.raises(RuntimeError, match="H a multiple of KVH"):
        extension.attention(q, cache, cache, bias, 4, 1.0, isa)
    with pytest.raises(RuntimeError, match="length 5 outside 1..4"):
        extension.attention(torch.randn(1, 2, 1, 8), cache, cache, torch.zeros(1, 1, 1, 5), 5, 1.0, isa)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rotary_dim", [0, 16, 24])  # none (ALiBi), partial, full
def test_rope_and_cache_equals_torch_ops(monkeypatch, dtype, interleaved, rotary_dim):
    batch, new, past, heads, kv_heads, d, capacity = 2, 3, 4, 4, 2, 24, 9
    attn = Attention(num_heads=heads, num_kv_heads=kv_heads, head_dim=d,
                     position=RoPE(theta=10000.0, max_positions=64, interleaved=interleaved,
                                   rotary_fraction=max(rotary_dim, 2) / d))
    gen = torch.Generator().manual_seed(rotary_dim + interleaved)
    qkv = torch.randn(batch, new, (heads + 2 * kv_heads) * d, generator=gen).to(dtype)
    angles = torch.rand(batch, new, max(rotary_dim, 2) // 2, generator=gen) * 20
    rotary = (angles.cos(), angles.sin()) if rotary_dim else None
    cache = [torch.randn(batch, kv_heads, capacity, d, generator=gen).to(dtype) for _ in range(2)]
    step = SimpleNamespace(past=past)
    fused_cache = [c.clone() for c in cache]
    fused = TorchOps().rope_and_cache(qkv, *fused_cache, rotary, step, attn)
    monkeypatch.setenv("POLYLM_GEMV_ISA", "none")  # the torch ops
    assert cpu_gemv.rope_and_cache(qkv, rotary, *cache, past, heads, kv_heads, d, rotary_dim, interleaved) is None
    expected = TorchOps().rope_and_cache(qkv, *cache, rotary, step, attn)
    assert torch.equal(fused, expected)  # the same roundings, bit for bit
    assert all(torch.equal(a, b) for a, b in zip(fused_cache, cache))
