"""The compiled fused kernels of the torch CPU path, on each ISA path this CPU runs: the gated activation
act(gate) * up and the decode attention against fp64 references, the residual add + RMSNorm against its formula;
then the ops that call them (`CpuOps`) against the reference ops (`ReferenceOps`) they replace."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from polylm.ir import MLP, Attention, Norm, RoPE
from polylm.numerics.masks import attention_bias
from polylm_torch import cpu_gemv
from polylm_torch.cpu_gemv import _build
from polylm_torch.cpu_ops import CpuOps
from polylm_torch_common.ops import ReferenceOps, StepTensors
from polylm_torch_common.params import NormParams
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
# per-head bias and several query rows, MHA with a head_dim that is not a multiple of 16, a single key; a group
# of 3 heads split into chunks of 2 and 1 (with 2 threads), head_dim 128 over a length that ends mid-block.
ATTENTION_CASES = [(1, 16, 1, 1, 64, 192, 256, 1), (2, 4, 2, 3, 48, 37, 40, 4), (1, 2, 2, 5, 80, 5, 5, 1),
                   (1, 2, 1, 1, 8, 1, 4, 1), (1, 3, 1, 1, 32, 70, 80, 3), (1, 6, 2, 1, 128, 300, 320, 1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ATTENTION_CASES)
@pytest.mark.parametrize("softcap", [0.0, 1.5])  # 0: none; 1.5 bites (scores reach ~±5 before the cap)
def test_attention_matches_fp64(extension, isa, dtype, case, softcap):
    batch, heads, kv_heads, new, d, length, capacity, bias_heads = case
    gen = torch.Generator().manual_seed(length)
    q = torch.randn(batch, heads, new, d, generator=gen).to(dtype)
    keys, values = (torch.randn(batch, kv_heads, capacity, d, generator=gen).to(dtype) for _ in range(2))
    bias = torch.randn(batch, bias_heads, new, length, generator=gen).to(dtype)
    if length > 1:
        bias[..., 0] = torch.finfo(dtype).min  # a masked slot, as the runtime marks them
    y = extension.attention(q, keys, values, bias, length, 0.3, softcap, isa)
    group = heads // kv_heads
    scores = q.double() @ keys[:, :, :length].double().repeat_interleave(group, 1).transpose(-1, -2) * 0.3
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    weights = torch.softmax(scores + bias.double(), dim=-1)
    ref = (weights @ values[:, :, :length].double().repeat_interleave(group, 1)).transpose(1, 2)
    ref = ref.reshape(batch, new, heads * d)
    assert y.shape == ref.shape and y.dtype == dtype
    # fp32: summation order; bf16: the output's rounding (values are O(1))
    assert (y.double() - ref).abs().max().item() <= (2e-6 if dtype == torch.float32 else 2.0**-7)


def test_attention_bad_input(extension, isa):
    q, cache, bias = torch.randn(1, 3, 1, 8), torch.randn(1, 2, 4, 8), torch.zeros(1, 1, 1, 4)
    with pytest.raises(RuntimeError, match="H a multiple of KVH"):
        extension.attention(q, cache, cache, bias, 4, 1.0, 0.0, isa)
    with pytest.raises(RuntimeError, match="length 5 outside 1..4"):
        extension.attention(torch.randn(1, 2, 1, 8), cache, cache, torch.zeros(1, 1, 1, 5), 5, 1.0, 0.0, isa)
    with pytest.raises(RuntimeError, match="softcap must be >= 0"):
        extension.attention(torch.randn(1, 2, 1, 8), cache, cache, bias, 4, 1.0, -1.0, isa)


# -- CpuOps against ReferenceOps ----------------------------------------------------------------------------

#: (absolute, relative) bound of |CpuOps − ReferenceOps|: fp32 differs by summation order; bf16 by where results
#: are rounded (once in a kernel, after every op in torch), a few units of bf16's 2^-8.
OPS_TOLERANCE = {torch.float32: (1e-6, 1e-5), torch.bfloat16: (2.0**-6, 2.0**-6)}


def assert_ops_agree(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    absolute, relative = OPS_TOLERANCE[dtype]
    assert got.shape == want.shape and got.dtype == want.dtype
    excess = (got.float() - want.float()).abs() - relative * want.float().abs()
    assert excess.max().item() <= absolute, excess.max().item()


@pytest.fixture(params=_isas())
def kernel_path(request, extension, monkeypatch) -> None:
    """Each kernel path this CPU runs, picked for `CpuOps` through POLYLM_GEMV_ISA."""
    monkeypatch.setenv("POLYLM_GEMV_ISA", request.param)


def random(*shape, dtype=torch.float32, seed=0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_delta", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_add_norm_op_matches_reference(kernel_path, dtype, with_delta, with_bias):
    x, delta = random(2, 3, 96, dtype=dtype), random(2, 3, 96, dtype=dtype, seed=1) if with_delta else None
    p = NormParams(Norm("rms", 1e-6, bias=with_bias), random(96, seed=2), random(96, seed=3) if with_bias else None)
    for got, want in zip(CpuOps().add_norm(x, delta, p), ReferenceOps().add_norm(x, delta, p)):
        assert_ops_agree(got, want, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh", "relu"])  # relu: no kernel, the reference op
def test_activation_op_matches_reference(kernel_path, dtype, activation):
    mlp, h = MLP(37, activation, gated=True), random(2, 3, 2 * 37, dtype=dtype) * 3
    assert_ops_agree(CpuOps().activation(h, mlp), ReferenceOps().activation(h, mlp), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("new", [1, 3, 17])  # 17 query rows: beyond the kernel's 16, the reference op
@pytest.mark.parametrize("softcap", [None, 0.5])  # Gemma 2's attention-logit softcap, small enough to bite
def test_attention_op_matches_reference(kernel_path, dtype, new, softcap):
    batch, heads, kv_heads, d, keys = 2, 4, 2, 32, 20
    attn = Attention(num_heads=heads, num_kv_heads=kv_heads, head_dim=d, position=RoPE(theta=10000.0,
                                                                                        max_positions=64),
                     softcap=softcap)
    mask = torch.ones(batch, keys, dtype=torch.bool)
    mask[1, :5] = False  # a left-padded row
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    past = keys - new
    step = StepTensors(input_ids=torch.zeros(batch, new, dtype=torch.int64), positions=positions,
                       new_positions=positions[:, past:], mask=mask,
                       slots=torch.arange(past, keys, dtype=torch.int32), gather=None, frequencies={},
                       alibi=None, past=past, dtype=dtype,
                       attention_bias=torch.from_numpy(attention_bias(attn, positions.numpy(), mask.numpy(), past,
                                                                      str(dtype).removeprefix('torch.'))).to(dtype))
    q = random(batch, heads, new, d, dtype=dtype, seed=4)
    cache_keys, cache_values = random(batch, kv_heads, keys + 3, d, dtype=dtype, seed=5), \
        random(batch, kv_heads, keys + 3, d, dtype=dtype, seed=6)
    assert_ops_agree(CpuOps().attention(q, cache_keys, cache_values, step, attn),
                     ReferenceOps().attention(q, cache_keys, cache_values, step, attn), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rotary_dim", [0, 16, 24])  # none (ALiBi), partial, full
def test_rope_and_cache_op_equals_reference(kernel_path, monkeypatch, dtype, interleaved, rotary_dim):
    batch, new, past, heads, kv_heads, d, capacity = 2, 3, 4, 4, 2, 24, 9
    attn = Attention(num_heads=heads, num_kv_heads=kv_heads, head_dim=d,
                     position=RoPE(theta=10000.0, max_positions=64, interleaved=interleaved,
                                   rotary_fraction=max(rotary_dim, 2) / d))
    gen = torch.Generator().manual_seed(rotary_dim + interleaved)
    qkv = torch.randn(batch, new, (heads + 2 * kv_heads) * d, generator=gen).to(dtype)
    angles = torch.rand(batch, new, max(rotary_dim, 2) // 2, generator=gen) * 20
    rotary = (angles.cos(), angles.sin()) if rotary_dim else None
    cache = [torch.randn(batch, kv_heads, capacity, d, generator=gen).to(dtype) for _ in range(2)]
    step = SimpleNamespace(past=past, ring_slots=None)
    fused_cache = [c.clone() for c in cache]
    fused = CpuOps().rope_and_cache(qkv, *fused_cache, rotary, step, attn)
    expected = ReferenceOps().rope_and_cache(qkv, *cache, rotary, step, attn)
    assert torch.equal(fused, expected)  # the same roundings, bit for bit
    assert all(torch.equal(a, b) for a, b in zip(fused_cache, cache))
    monkeypatch.setenv("POLYLM_GEMV_ISA", "none")  # the kernel declines: CpuOps is the reference op
    declining = cpu_gemv.fused_kernels()
    assert declining.rope_and_cache(qkv, rotary, *cache, past, heads, kv_heads, d, rotary_dim, interleaved) is None
