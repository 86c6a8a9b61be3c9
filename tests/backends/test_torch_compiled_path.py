"""The torch backend's compiled CPU path (packed kernels, the bf16 prefill GEMM, the fused norm, activation,
RoPE + cache write and decode attention) against the same model on stock torch ops (`POLYLM_GEMV_ISA=none`),
end to end, in fp32 and bf16: a batch of padded prompts, one of them longer than the kernels' 16 rows."""

import numpy as np
import pytest

import checkpoints
import polylm
from polylm.testing import SEQUENCES, padded

LONG = [1] + list(range(5, 45))  # 41 tokens: prefill goes through the large-M path (the GEMM in bf16)
# Largest |logit diff| over real positions, relative to the largest |logit|: fp32 differs by summation order
# only; bf16 by where intermediate results are rounded (once in a fused kernel, after every op in torch).
TOLERANCE = {"float32": 1e-5, "bfloat16": 0.05}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("family", checkpoints.FAMILIES)
def test_compiled_path_matches_stock_ops(make_ckpt, monkeypatch, family, dtype):
    directory = make_ckpt(family)
    ids, mask = padded(SEQUENCES + [LONG], "left")
    compiled = polylm.load(directory, backend="torch", dtype=dtype)
    got, got_tokens = compiled.forward(ids, mask), compiled.generate(LONG, max_new_tokens=8)
    monkeypatch.setenv("POLYLM_GEMV_ISA", "none")  # read by every layer and fused op: stock torch from here on
    stock = polylm.load(directory, backend="torch", dtype=dtype)
    want, want_tokens = stock.forward(ids, mask), stock.generate(LONG, max_new_tokens=8)
    real = mask.astype(bool)
    scale = np.abs(want[real]).max()
    assert np.abs(got - want)[real].max() <= TOLERANCE[dtype] * scale
    agreement = (got.argmax(-1) == want.argmax(-1))[real].mean()
    assert agreement == 1.0 if dtype == "float32" else agreement >= 0.9
    if dtype == "float32":
        assert got_tokens == want_tokens
