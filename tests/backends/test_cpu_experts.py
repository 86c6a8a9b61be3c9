"""`CpuOps.routed_experts` (the torch backend's decode path for routed experts) equals the reference op's
grouping run with the same (compiled) expert kernels bit for bit, and `ReferenceOps.experts` within the compiled
activation's rounding: float32/bfloat16 tensors, packed and int8/int4 expert layers (one token through the
compiled `RoutedExperts` layer — router, routing and experts in one call — where the layers are kernel layers with
SiLU/GELU gating), 1/3/32 tokens, top-k 1/2/4, shared experts, biases; the compiled routing's ties."""

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


COMPILED = {"top2-normalized": MOES["top2-normalized"], "top4-shared": MOES["top4-shared"],
            "top2-topk-softmax": MoE(EXPERTS, 2, MLP(32, "gelu_tanh", gated=True), "topk_softmax")}


def spy(ops: CpuOps) -> list:
    """Make `ops` record the compiled mixture-of-experts layers it calls."""
    calls, make = [], ops._kernels.routed_experts

    def recording(*args):
        layer = make(*args)
        return None if layer is None else lambda x: calls.append(layer(x)) or calls[-1]
    ops._kernels.routed_experts = recording
    return calls


@pytest.mark.parametrize("layer", ["packed", "int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", COMPILED)
def test_one_token_takes_the_compiled_layer(case, dtype, layer):
    """One token with kernel expert layers: router, routing and experts in one compiled call, equal to the torch
    routing + grouping with the same kernels within the compiled router's and softmax's last-bit roundings."""
    moe = COMPILED[case]
    p = params(moe, dtype, layer)
    ops = CpuOps()
    calls = spy(ops)
    for seed in range(8):
        x = torch.randn(1, HIDDEN, generator=torch.Generator().manual_seed(seed)).to(dtype)
        got = ops.routed(x, p, moe)
        assert len(calls) == seed + 1 and calls[-1] is got and got.dtype == dtype and got.shape == (1, HIDDEN)
        weights, chosen = route(ops.linear(x, p.router, p.router_bias), moe)
        want = ReferenceOps.routed_experts(ops, x, weights, chosen, p, moe).float()
        tolerance = 4e-6 if dtype == torch.float32 else 2 ** -8
        assert (got.float() - want).abs().max().item() <= tolerance * want.abs().max().item()


@pytest.mark.parametrize("routing", ["softmax_topk", "topk_softmax"])
def test_compiled_routing_breaks_ties_by_lowest_id(routing):
    """Experts 2..5 with one router row tie for the top: the compiled layer takes the lowest ids, 2 and 3, with
    equal weights (the torch reference is given that choice explicitly)."""
    moe = MoE(EXPERTS, 2, GATED, routing, normalize=True)
    p = params(moe, torch.float32, "packed")
    x = torch.randn(1, HIDDEN, generator=torch.Generator().manual_seed(3))
    top = x[0] / x[0].norm()
    p.router[:] = -top
    p.router[2:] = top
    got = CpuOps().routed(x, p, moe)
    want = ReferenceOps.routed_experts(CpuOps(), x, torch.tensor([[0.5, 0.5]]), torch.tensor([[2, 3]]), p, moe)
    assert torch.equal(got, want)
