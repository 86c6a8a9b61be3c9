"""The torch backend's compiled CPU path (packed kernels, the bf16 prefill GEMM, the fused norm, activation,
RoPE + cache write and decode attention) against the reference — the shared runtime on plain weight tensors with
the plain-torch `ReferenceOps` —, end to end, in fp32 and bf16: a batch of padded prompts, one of them longer than
the kernels' 32 rows. The reference itself never enters the compiled extension, and `POLYLM_GEMV_ISA=none` makes
the torch backend compute exactly as it does."""

import numpy as np
import pytest

import checkpoints
import polylm
from polylm.testing import SEQUENCES, padded
from polylm_torch import TorchBackend, cpu_gemv
from polylm_torch.cpu_gemv import _build
from polylm_torch_common.runtime import TorchRuntime

LONG = [1] + list(range(5, 45))  # 41 tokens: prefill goes through the large-M path (the GEMM in bf16)
# Largest |logit diff| over real positions, relative to the largest |logit|: fp32 differs by summation order
# only; bf16 by where intermediate results are rounded (once in a fused kernel, after every op in torch).
TOLERANCE = {"float32": 1e-5, "bfloat16": 0.05}


def reference_model(directory, dtype: str) -> polylm.Model:
    """The checkpoint on the shared runtime with its default ops (the reference) and no kernel layers."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(TorchBackend, "lower", lambda self, ir, weights, dtype: TorchRuntime(ir, weights, dtype))
        return polylm.load(directory, backend="torch", dtype=dtype)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("family", checkpoints.FAMILIES)
def test_compiled_path_matches_the_reference(make_ckpt, family, dtype):
    directory = make_ckpt(family)
    ids, mask = padded(SEQUENCES + [LONG], "left")
    compiled = polylm.load(directory, backend="torch", dtype=dtype)
    got, got_tokens = compiled.forward(ids, mask), compiled.generate(LONG, max_new_tokens=8)
    reference = reference_model(directory, dtype)
    want, want_tokens = reference.forward(ids, mask), reference.generate(LONG, max_new_tokens=8)
    real = mask.astype(bool)
    scale = np.abs(want[real]).max()
    assert np.abs(got - want)[real].max() <= TOLERANCE[dtype] * scale
    agreement = (got.argmax(-1) == want.argmax(-1))[real].mean()
    assert agreement == 1.0 if dtype == "float32" else agreement >= 0.9
    if dtype == "float32":
        assert got_tokens == want_tokens


def refuse_compiled_kernels(monkeypatch) -> None:
    """Every way into the compiled extension raises: building or picking it, and each fused op."""
    def refuse(*args, **kwargs):
        raise AssertionError("the compiled CPU kernels were called")

    for module, name in ((_build, "load"), (_build, "select_isa"), (cpu_gemv, "fused_kernels"),
                         (cpu_gemv.FusedKernels, "add_rms_norm"), (cpu_gemv.FusedKernels, "gated_activation"),
                         (cpu_gemv.FusedKernels, "attention"), (cpu_gemv.FusedKernels, "rope_and_cache"),
                         (cpu_gemv.FusedKernels, "routed_experts"), (cpu_gemv.FusedKernels, "decode_block")):
        monkeypatch.setattr(module, name, refuse)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("family", ["gemma", "bloom"])  # RMSNorm, RoPE, gated MLP; LayerNorm, ALiBi, plain MLP
def test_reference_never_calls_the_extension_and_is_stock_torch(make_ckpt, monkeypatch, family, dtype):
    directory = make_ckpt(family)
    ids, mask = padded(SEQUENCES + [LONG], "left")
    monkeypatch.setenv("POLYLM_GEMV_ISA", "none")  # read by every layer and fused op: stock torch
    stock = polylm.load(directory, backend="torch", dtype=dtype)
    want, want_tokens = stock.forward(ids, mask), stock.generate(LONG, max_new_tokens=4)
    refuse_compiled_kernels(monkeypatch)
    reference = reference_model(directory, dtype)
    got, got_tokens = reference.forward(ids, mask), reference.generate(LONG, max_new_tokens=4)
    assert np.array_equal(got, want) and got_tokens == want_tokens
