"""`CpuOps.routed_experts` (the torch backend's decode path for routed experts) equals the reference op's
grouping run with the same (compiled) expert kernels bit for bit, and `ReferenceOps.experts` within the compiled
activation's rounding: float32/bfloat16 tensors, packed and int8/int4 expert layers (one token through the
compiled `expert_mlps` call where the layers are kernel layers with SiLU/GELU gating), 1/3/32 tokens, top-k 1/2/4, shared experts,
biases."""

from __future__ import annotations

import pytest
import torch

from polylm.backend import ExpertParams
from polylm.ir import MLP, MoE
from polylm_torch.cpu_gemv import Int4Linear, Int8Linear, PackedLinear
from polylm_torch.cpu_ops import CpuOps
from polylm_torch_common.ops import ReferenceOps, route

HIDDEN, EXPERTS = 64, 6
GATED = MLP(32, "silu", gated=True)
LAYERS = {"float": None, "packed": PackedLinear, "int8": Int8Linear.from_float, "int4": Int4Linear.from_float}


def params(moe: MoE, dtype: torch.dtype, layer: str) -> ExpertParams:
    g = torch.Generator().manual_seed(0)

    def rand(*shape, scale=0.3):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    def matrix(*shape):
        weight = rand(*shape)
        return weight if LAYERS[layer] is None else LAYERS[layer](weight)

    expert = moe.expert
    up_rows = 2 * expert.intermediate_size if expert.gated else expert.intermediate_size
    shared = (None,) * 4
    if moe.shared is not None:
        shared = (rand(2 * moe.shared.intermediate_size, HIDDEN), None, rand(HIDDEN, moe.shared.intermediate_size),
                  None)
    return ExpertParams(rand(EXPERTS, HIDDEN, scale=1.0), rand(EXPERTS) if moe.router_bias else None,
                        [matrix(up_rows, HIDDEN) for _ in range(EXPERTS)],
                        [rand(up_rows) if expert.bias else None for _ in range(EXPERTS)],
                        [matrix(HIDDEN, expert.intermediate_size) for _ in range(EXPERTS)],
                        [rand(HIDDEN) if expert.bias else None for _ in range(EXPERTS)], *shared,
                        shared_gate=rand(1, HIDDEN) if moe.shared is not None else None)


MOES = {
    "top1": MoE(EXPERTS, 1, MLP(32, "gelu_tanh", gated=False), router_bias=True),
    "top2-normalized": MoE(EXPERTS, 2, GATED, normalize=True),
    "top4-shared": MoE(EXPERTS, 4, GATED, shared=MLP(24, "silu", gated=True), shared_gate=True),
    "gpt-oss-biases": MoE(EXPERTS, 2, MLP(32, "swiglu_oai", gated=True, bias=True, limit=1.5), "topk_softmax",
                          router_bias=True),
}


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 32])
@pytest.mark.parametrize("case", MOES)
def test_cpu_experts_equal_the_reference_op(case, rows, dtype, layer):
    moe = MOES[case]
    p = params(moe, dtype, layer)
    x = torch.randn(rows, HIDDEN, generator=torch.Generator().manual_seed(1)).to(dtype)
    ops = CpuOps()
    weights, chosen = route(ops.linear(x, p.router, p.router_bias), moe)
    grouped = ReferenceOps.routed_experts(ops, x, weights, chosen, p, moe)  # the same kernels, grouped by expert
    got = ops.routed_experts(x, weights, chosen, p, moe)
    assert got.dtype == dtype and got.shape == (rows, HIDDEN)
    assert torch.equal(got, grouped)
    # bound: the compiled activation rounds apart from the reference one (relative to the largest output)
    full, want = ops.experts(x, p, moe).float(), ReferenceOps().experts(x, p, moe).float()
    tolerance = 1e-6 if dtype == torch.float32 else 2 ** -7
    assert (full - want).abs().max().item() <= tolerance * want.abs().max().item()


@pytest.mark.parametrize("layer", ["packed", "int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_token_takes_the_compiled_call(dtype, layer):
    moe = MOES["top2-normalized"]
    p = params(moe, dtype, layer)
    x = torch.randn(1, HIDDEN, generator=torch.Generator().manual_seed(2)).to(dtype)
    ops = CpuOps()
    calls = []
    compiled = ops._kernels.expert_mlps
    ops._kernels.expert_mlps = lambda *args: calls.append(compiled(*args)) or calls[-1]
    weights, chosen = route(ops.linear(x, p.router, p.router_bias), moe)
    got = ops.routed_experts(x, weights, chosen, p, moe)
    assert len(calls) == 1 and calls[0] is got
    assert torch.equal(got, ReferenceOps.routed_experts(ops, x, weights, chosen, p, moe))
