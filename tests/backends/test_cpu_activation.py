"""The compiled gated activation of the torch CPU path: act(gate) * up against an fp64 reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from polylm_torch.cpu_gemv import _build

ACTIVATIONS = {0: F.silu, 1: lambda x: F.gelu(x, approximate="tanh")}


@pytest.fixture(scope="module")
def module():
    module, isa, reason = _build.select_isa()
    assert module is not None, f"the kernels should build on this machine: {reason}"
    if not module.cpu_has("avx512"):
        pytest.skip("the fused activation is AVX-512 only; stock torch ops run elsewhere")
    return module


@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 2 * 37), (2, 5, 2 * 4096), (1, 2)])
def test_gated_activation_matches_fp64(module, act, dtype, shape):
    h = (torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape))) * 4).to(dtype)
    gate, up = h.double().chunk(2, dim=-1)
    ref = ACTIVATIONS[act](gate) * up
    y = module.gated_activation(h, act)
    assert y.shape == ref.shape and y.dtype == dtype
    # fp32: a few ulp of the largest output (torch's own ops are at 1e-7 too); bf16: one rounding of the output.
    bound = (2e-7 if dtype == torch.float32 else 2.0**-8) * (ref.abs() + ref.abs().max())
    assert ((y.double() - ref).abs() <= bound).all(), (y.double() - ref).abs().max().item()


def test_gated_activation_edges(module):
    h = torch.tensor([[math.nan, 100.0, -100.0, 0.0, 2.0, 2.0, 2.0, 2.0]])
    y = module.gated_activation(h, 1)
    assert math.isnan(y[0, 0]) and y[0, 1].item() == 200.0 and abs(y[0, 2].item()) < 1e-30 and y[0, 3].item() == 0.0
    assert module.gated_activation(torch.empty(0, 8), 0).shape == (0, 4)
    with pytest.raises(RuntimeError, match="even last dimension"):
        module.gated_activation(torch.randn(2, 5), 0)
