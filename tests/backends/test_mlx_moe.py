"""Mixture-of-experts on the MLX backend: the experts op against the torch reference op (routings, normalization,
router bias, expert biases, a shared expert with and without its gate; sorted and unsorted gathers), the routing
itself, Mixtral against transformers, int8/int4 experts against the torch backend's, and two tensor-parallel
ranks against one process."""


import mlx.core as mx
import numpy as np
import pytest
import torch
import transformers

import polylm
from polylm import testing
from polylm.backend import ExpertParams
from polylm.ir import MLP, MoE
from polylm.testing import SEQUENCES, padded
from polylm_mlx import ops
from polylm_mlx.params import _experts
from polylm_torch_common.ops import ReferenceOps, route
from test_parity import assert_parity
from test_quantized_backends import EXACT
from test_tensor_parallel import assert_matches_one_process
from test_tensor_parallel_mlx import run_two_mlx_ranks

HIDDEN, EXPERTS = 32, 8
#: (routing, top_k, normalize, router bias, expert MLP, shared expert, shared gate)
CASES = {
    "mixtral": ("softmax_topk", 2, True, False, MLP(24, "silu", gated=True), None, False),
    "qwen2-moe": ("softmax_topk", 2, False, True, MLP(24, "silu", gated=True), MLP(40, "silu", gated=True), True),
    "topk-softmax": ("topk_softmax", 3, False, True, MLP(24, "gelu", gated=False, bias=True),
                     MLP(16, "relu", gated=False, bias=True), False),
}
#: Mixtral checkpoint: 4 experts, 2 per token, over 2 layers
MIXTRAL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               head_dim=16, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=256)


def canonical(moe: MoE, rng: np.random.Generator, module: str = "layers.0.mlp") -> dict[str, np.ndarray]:
    """Random canonical tensors of `moe` (`polylm.ir.ModelIR.tensor_shapes` names)."""
    def mlp_tensors(prefix, mlp, lead=()):
        names = (("gate", "up") if mlp.gated else ("up",))
        out = {f"{prefix}.{n}.weight": rng.normal(0, 0.2, (*lead, mlp.intermediate_size, HIDDEN)) for n in names}
        out[f"{prefix}.down.weight"] = rng.normal(0, 0.2, (*lead, HIDDEN, mlp.intermediate_size))
        if mlp.bias:
            out.update({f"{prefix}.{n}.bias": rng.normal(0, 0.2, (*lead, mlp.intermediate_size)) for n in names})
            out[f"{prefix}.down.bias"] = rng.normal(0, 0.2, (*lead, HIDDEN))
        return out

    tensors = {f"{module}.router.weight": rng.normal(0, 0.5, (moe.num_experts, HIDDEN)),
               **mlp_tensors(f"{module}.experts", moe.expert, (moe.num_experts,))}
    if moe.router_bias:
        tensors[f"{module}.router.bias"] = rng.normal(0, 0.5, (moe.num_experts,))
    if moe.shared is not None:
        tensors.update(mlp_tensors(f"{module}.shared", moe.shared))
    if moe.shared_gate:
        tensors[f"{module}.shared_gate.weight"] = rng.normal(0, 0.3, (1, HIDDEN))
    return {name: t.astype(np.float32) for name, t in tensors.items()}


def torch_params(moe: MoE, tensors: dict[str, np.ndarray], module: str = "layers.0.mlp") -> ExpertParams:
    """The torch reference op's params: a [gate; up] and a down matrix per expert, the shared expert fused."""
    t = {name: torch.from_numpy(a) for name, a in tensors.items()}
    get = t.get

    def up(prefix, mlp, param):
        parts = [t[f"{prefix}.{n}.{param}"] for n in (("gate", "up") if mlp.gated else ("up",))]
        return torch.cat(parts, dim=-2 if param == "weight" else -1)

    ex = f"{module}.experts"
    per = range(moe.num_experts)
    ups, downs = up(ex, moe.expert, "weight"), t[f"{ex}.down.weight"]
    up_bias = up(ex, moe.expert, "bias") if moe.expert.bias else None
    down_bias = get(f"{ex}.down.bias")
    shared = (None,) * 4
    if moe.shared is not None:
        sh = f"{module}.shared"
        shared = (up(sh, moe.shared, "weight"), up(sh, moe.shared, "bias") if moe.shared.bias else None,
                  t[f"{sh}.down.weight"], get(f"{sh}.down.bias"))
    return ExpertParams(t[f"{module}.router.weight"], get(f"{module}.router.bias"), [ups[e] for e in per],
                        [None if up_bias is None else up_bias[e] for e in per], [downs[e] for e in per],
                        [None if down_bias is None else down_bias[e] for e in per], *shared,
                        shared_gate=get(f"{module}.shared_gate.weight"))


@pytest.mark.parametrize("shape", [(2, 40), (3, 1)], ids=["sorted", "unsorted"])
@pytest.mark.parametrize("case", list(CASES))
def test_experts_op_matches_torch_reference(case, shape):
    routing, top_k, normalize, router_bias, expert, shared, gate = CASES[case]
    moe = MoE(EXPERTS, top_k, expert, routing, normalize, router_bias, shared, gate)
    rng = np.random.default_rng(7)
    tensors = canonical(moe, rng)
    x = rng.normal(0, 1, (*shape, HIDDEN)).astype(np.float32)
    assert (x.size // HIDDEN * top_k >= ops.SORT_FROM) == (shape == (2, 40))  # both gather paths are taken
    expected = ReferenceOps().experts(torch.from_numpy(x), torch_params(moe, tensors), moe).numpy()
    params = _experts(moe, {name: mx.array(a) for name, a in tensors.items()}, "layers.0.mlp", None)
    got = np.array(ops.experts(mx.array(x), params, moe))
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=2e-5, rtol=1e-5)
    chosen = np.array(ops.route(mx.array(x) @ mx.array(tensors["layers.0.mlp.router.weight"]).T
                                + (mx.array(tensors["layers.0.mlp.router.bias"]) if router_bias else 0), moe)[1])
    assert len({tuple(sorted(c)) for c in chosen.reshape(-1, top_k)}) >= 2  # routing differs per token


@pytest.mark.parametrize("routing,normalize", [("softmax_topk", True), ("softmax_topk", False),
                                               ("topk_softmax", False)])
def test_route_matches_torch(routing, normalize):
    moe = MoE(EXPERTS, 3, MLP(8, "silu", gated=True), routing, normalize)
    logits = np.random.default_rng(3).normal(0, 2, (50, EXPERTS)).astype(np.float32)
    weights, chosen = ops.route(mx.array(logits), moe)
    reference_weights, reference_chosen = route(torch.from_numpy(logits), moe)
    np.testing.assert_array_equal(np.array(chosen), reference_chosen.numpy())  # same order: descending
    np.testing.assert_allclose(np.array(weights), reference_weights.numpy(), rtol=1e-6, atol=1e-7)
    assert np.array(weights).dtype == np.float32
    # ties: the lower expert index first (a stable descending sort)
    tied = mx.array([[0.0, 1.0, 1.0, 0.5, 1.0, 0.0, 0.0, 0.0]])
    assert np.array(ops.route(tied, moe)[1]).tolist() == [[1, 2, 4]]


@pytest.fixture(scope="module")
def mixtral(ckpt_root):
    return testing.tiny_checkpoint(ckpt_root, "mixtral", **MIXTRAL)


def test_mixtral_matches_transformers(mixtral):
    hf = transformers.AutoModelForCausalLM.from_pretrained(mixtral, dtype=torch.float32).eval()
    ids, mask = padded(SEQUENCES, "right")
    with torch.no_grad():
        logits = hf(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), output_router_logits=True)
    for layer in logits.router_logits:  # [tokens, experts]
        chosen = layer.topk(MIXTRAL["num_experts_per_tok"], dim=-1).indices[torch.from_numpy(mask).flatten() > 0]
        assert len({tuple(sorted(c)) for c in chosen.tolist()}) >= 2
    assert_parity(mixtral, "causal-lm", "mlx", hf=hf)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized_experts_match_torch(mixtral, bits):
    """Both backends multiply with the core reference's scale · q (`polylm.numerics.quantization`): only the order
    of float32 operations differs (measured: at most 1.7e-6)."""
    ids, mask = padded(SEQUENCES, "left")
    real = mask.astype(bool)
    ours = polylm.load(mixtral, backend="mlx", dtype="float32", quantize=bits)
    reference = polylm.load(mixtral, backend="torch", dtype="float32", quantize=bits)
    assert np.abs(ours.forward(ids, mask)[real] - reference.forward(ids, mask)[real]).max() <= EXACT
    prompts = [list(s) for s in SEQUENCES[:2]]
    assert ours.generate(prompts, max_new_tokens=4) == reference.generate(prompts, max_new_tokens=4)


def test_two_mlx_ranks_match_one_process(mixtral, tmp_path):
    """Each rank computes every expert's share of the intermediate (`polylm.parallel.plan`), summed over ranks."""
    rank0, _ = run_two_mlx_ranks({"mixtral": str(mixtral)}, tmp_path)
    assert_matches_one_process(rank0["mixtral"], polylm.load(mixtral, backend="mlx", dtype="float32"))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_near_torch(mixtral, dtype):
    """In half precision (on the CPU the dense stacks multiply in float32: MLX's CPU gather_mm has no half
    kernel) the logits stay as near torch's as torch's are to float32 (measured: bf16 0.027, fp16 0.0026)."""
    ids, mask = padded(SEQUENCES, "left")
    real = mask.astype(bool)
    ours = polylm.load(mixtral, backend="mlx", dtype=dtype).forward(ids, mask)[real]
    reference = polylm.load(mixtral, backend="torch", dtype=dtype).forward(ids, mask)[real]
    assert np.abs(ours - reference).max() <= (0.1 if dtype == "bfloat16" else 0.01)
    assert (ours.argmax(-1) == reference.argmax(-1)).mean() >= 0.95
