"""The Triton backend's routed experts (`polylm_triton.experts`): the grouping of (token, choice) pairs by expert,
and the grouped matmul against the torch reference op (`ReferenceOps.experts`) for several expert counts, top-k
and token counts (decode's one token; experts no token chose), float and weight-only int8/int4 stacks, biases,
gated and clamped activations, a shared expert. Shapes are tiny: the interpreter is slow."""

from dataclasses import replace

import pytest
import torch

from polylm.backend import ExpertParams
from polylm.ir import MLP, MoE, Quantization
from polylm_torch_common.ops import ReferenceOps, route
from polylm_triton import experts, quantized
from polylm_triton.ops import TritonOps

HIDDEN = 40  # not a power of two: masked tiles

#: name → (experts, top_k, tokens, routing, normalize, router bias, expert MLP, shared expert)
CASES = {
    "decode-1-token": (6, 2, 1, "softmax_topk", True, False, MLP(24, "silu", gated=True), None),
    "unchosen-experts": (8, 2, 3, "softmax_topk", False, False, MLP(24, "silu", gated=True), None),
    "top1-many-tokens": (4, 1, 21, "softmax_topk", False, True, MLP(16, "gelu_tanh", gated=False), None),
    "top3-shared": (5, 3, 9, "softmax_topk", True, False, MLP(24, "silu", gated=True),
                    MLP(20, "silu", gated=True)),
    "gpt-oss": (4, 2, 7, "topk_softmax", False, True, MLP(24, "swiglu_oai", gated=True, bias=True, limit=1.5), None),
    "prefill-dot-tiles": (4, 2, 40, "softmax_topk", True, False, MLP(24, "silu", gated=True, bias=True), None),
}
#: measured largest |triton − reference| (float32, float and quantized stacks): 4.8e-6
EXACT = 2e-5


def params(moe: MoE, seed: int = 0) -> ExpertParams:
    """Random params as the torch runtime holds them: a [gate; up] and a down matrix per expert (lists)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.3):
        return torch.randn(*shape, generator=g) * scale

    expert, e = moe.expert, moe.num_experts
    up_rows = 2 * expert.intermediate_size if expert.gated else expert.intermediate_size
    shared = (None,) * 4
    if moe.shared is not None:
        rows = 2 * moe.shared.intermediate_size if moe.shared.gated else moe.shared.intermediate_size
        shared = (rand(rows, HIDDEN), None, rand(HIDDEN, moe.shared.intermediate_size), None)
    return ExpertParams(rand(e, HIDDEN, scale=1.0), rand(e) if moe.router_bias else None,
                        [rand(up_rows, HIDDEN) for _ in range(e)],
                        [rand(up_rows) if expert.bias else None for _ in range(e)],
                        [rand(HIDDEN, expert.intermediate_size) for _ in range(e)],
                        [rand(HIDDEN) if expert.bias else None for _ in range(e)], *shared,
                        shared_gate=rand(1, HIDDEN) if moe.shared is not None else None)


def stacked(p: ExpertParams, spec: Quantization | None = None) -> tuple[ExpertParams, ExpertParams]:
    """(the triton op's params: quantized if asked, stacked over the experts; the reference's: the same weights
    as float lists — the quantized ones dequantized)."""
    ups, downs = list(p.experts_up), list(p.experts_down)
    if spec is not None:
        ups, downs = [quantized.quantize(m, spec) for m in ups], [quantized.quantize(m, spec) for m in downs]
    ours = replace(p, experts_up=experts.stack(ups), experts_down=experts.stack(downs),
                   experts_up_bias=None if p.experts_up_bias[0] is None else torch.stack(p.experts_up_bias),
                   experts_down_bias=None if p.experts_down_bias[0] is None else torch.stack(p.experts_down_bias))
    if spec is None:
        return ours, p
    return ours, replace(p, experts_up=[m.dequantize() for m in ups], experts_down=[m.dequantize() for m in downs])


def moe_of(case: str) -> tuple[MoE, int]:
    num_experts, top_k, tokens, routing, normalize, bias, expert, shared = CASES[case]
    return MoE(num_experts, top_k, expert, routing, normalize, bias, shared, shared is not None), tokens


@pytest.mark.parametrize("case", CASES)
def test_grouped_matmul_matches_the_reference_op(case):
    moe, tokens = moe_of(case)
    p = params(moe)
    ours, reference = stacked(p)
    x = torch.randn(tokens, HIDDEN, generator=torch.Generator().manual_seed(1))
    expected = ReferenceOps().experts(x, reference, moe)
    got = TritonOps().experts(x, ours, moe)
    assert got.shape == expected.shape and (got - expected).abs().max() <= EXACT
    chosen = route(x @ p.router.T + (p.router_bias if p.router_bias is not None else 0), moe)[1]
    if case == "unchosen-experts":
        assert len(chosen.unique()) < moe.num_experts  # some expert is never read
    if tokens > 2:
        assert len({tuple(sorted(row)) for row in chosen.tolist()}) >= 2  # routing differs per token


@pytest.mark.parametrize("bits,group_size", [(8, None), (4, 32), (8, 12), (4, 12)])
@pytest.mark.parametrize("case", ["decode-1-token", "prefill-dot-tiles", "gpt-oss"])
def test_quantized_stacks_multiply_with_scale_times_q(case, bits, group_size):
    """int8/int4 expert stacks give the reference op on their dequantized weights (float32 order aside)."""
    moe, tokens = moe_of(case)
    spec = Quantization(bits, group_size)
    ours, reference = stacked(params(moe), spec)
    x = torch.randn(tokens, HIDDEN, generator=torch.Generator().manual_seed(2))
    got, expected = TritonOps().experts(x, ours, moe), ReferenceOps().experts(x, reference, moe)
    assert (got - expected).abs().max() <= EXACT


def cast(p: ExpertParams, dtype: torch.dtype) -> ExpertParams:
    """`p` with every float tensor (in lists too) in `dtype`."""
    def to(value):
        if isinstance(value, list):
            return [to(v) for v in value]
        return value.to(dtype) if isinstance(value, torch.Tensor) else value

    return ExpertParams(**{name: to(getattr(p, name)) for name in p.__dataclass_fields__})


@pytest.mark.parametrize("case", ["decode-1-token", "prefill-dot-tiles", "gpt-oss"])
def test_float16_is_as_close_to_float32_as_the_reference(case):
    """In float16, no farther from the float32 result than the reference op in float16 (measured: the same or
    closer; largest 0.024 at |outputs| ≈ 5)."""
    moe, tokens = moe_of(case)
    ours, reference = stacked(params(moe))
    x = torch.randn(tokens, HIDDEN, generator=torch.Generator().manual_seed(3))
    exact = ReferenceOps().experts(x, reference, moe)
    got = TritonOps().experts(x.half(), cast(ours, torch.float16), moe).float()
    half = ReferenceOps().experts(x.half(), cast(reference, torch.float16), moe).float()
    assert (got - exact).abs().max() <= max(1.25 * (half - exact).abs().max(), 2e-3)


def test_pairs_are_grouped_by_expert_in_token_order():
    chosen = torch.tensor([[3, 0], [0, 1], [3, 1], [0, 3]])  # expert 2 unchosen
    ids, block_experts = experts.group_by_expert(chosen, 4, block_m=2)
    pad = 8  # the pair count
    assert ids.tolist() == [1, 2, 6, pad, 3, 5, 0, 4, 7, pad, pad, pad]
    assert block_experts.tolist() == [0, 0, 1, 3, 3, 4]  # the last block is spare
    assert len(block_experts) == (8 + 4 * 1) // 2  # the most blocks 8 pairs over 4 experts can need
