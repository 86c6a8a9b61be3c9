"""gpt-oss's clamped SwiGLU (`MLP` activation "swiglu_oai"): the reference op against transformers' own
`GptOssExperts._apply_gate` (which reads gate and up interleaved; polylm's [gate; up] halves), and the Triton, CPU
and MLX ops against the reference op."""

import mlx.core as mx
import numpy as np
import pytest
import torch
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

from polylm.errors import IRError
from polylm.ir import MLP
from polylm_mlx import ops as mlx_ops
from polylm_torch.cpu_ops import CpuOps
from test_triton_kernels import REFERENCE, TRITON

LIMIT = 1.5
MLP_IR = MLP(24, "swiglu_oai", gated=True, bias=True, limit=LIMIT, alpha=1.3)


def halves() -> torch.Tensor:
    """[gate; up] rows spanning ±4: both clamps bite."""
    return torch.randn(5, 7, 48, generator=torch.Generator().manual_seed(0)) * 2


def test_reference_op_is_transformers_gate():
    h = halves()
    experts = GptOssExperts.__new__(GptOssExperts)
    experts.limit, experts.alpha = LIMIT, MLP_IR.alpha
    interleaved = torch.stack(h.chunk(2, dim=-1), dim=-1).flatten(-2)  # gate, up, gate, up, …
    got = REFERENCE.activation(h, MLP_IR)
    assert (got - experts._apply_gate(interleaved)).abs().max().item() <= 1e-6
    unclamped = REFERENCE.activation(h, MLP(24, "swiglu_oai", gated=True, limit=100.0, alpha=1.3))
    assert (got - unclamped).abs().max().item() > 0.5


@pytest.mark.parametrize("ops", [TRITON, CpuOps()], ids=["triton", "cpu"])
def test_torch_backends_match_the_reference(ops):
    h = halves()
    assert torch.equal(ops.activation(h, MLP_IR), REFERENCE.activation(h, MLP_IR))


def test_mlx_op_matches_the_reference():
    h = halves()
    got = np.array(mlx_ops.activation(mx.array(h.numpy()), MLP_IR))
    assert np.abs(got - REFERENCE.activation(h, MLP_IR).numpy()).max() <= 1e-6


def test_the_ir_checks_the_limit():
    with pytest.raises(IRError, match="swiglu_limit"):
        MLP(24, "swiglu_oai", gated=True)
    with pytest.raises(IRError, match="gated"):
        MLP(24, "swiglu_oai", gated=False, limit=1.0)
    with pytest.raises(IRError, match="takes no swiglu_limit"):
        MLP(24, "silu", gated=True, limit=1.0)
