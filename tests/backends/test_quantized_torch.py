"""Weight-only int8/int4 on the torch backend: close to the unquantized model, same top-1 almost everywhere."""

import numpy as np
import pytest

import checkpoints
import polylm
from polylm.testing import SEQUENCES, padded

# Against the unquantized model on the tiny random checkpoints (logits span about ±5; random weights have no
# outliers to spare, so int4 with groups of 32 over a 64-wide hidden state is a harsh case): the largest
# |logit diff|, the mean |logit diff|, and the share of real positions whose top-1 token agrees. The layers
# themselves equal a matmul with their dequantized weights (tests/backends/test_cpu_gemv.py).
TOLERANCE = {"int8": (0.15, 0.02, 0.95), "int4": (2.0, 0.3, 0.5)}


@pytest.mark.parametrize("quantize", ["int8", "int4"])
@pytest.mark.parametrize("family", checkpoints.FAMILIES)
def test_quantized_close_to_unquantized(make_ckpt, family, quantize):
    directory = make_ckpt(family)
    exact = polylm.load(directory, backend="torch")
    quantized = polylm.load(directory, backend="torch", quantize=quantize)
    ids, mask = padded(SEQUENCES, "left")
    ref, got = exact.forward(ids, mask), quantized.forward(ids, mask)
    real = mask.astype(bool)
    largest, mean, agreement = TOLERANCE[quantize]
    diff = np.abs(got - ref)[real]
    assert diff.max() <= largest and diff.mean() <= mean
    assert (got.argmax(-1) == ref.argmax(-1))[real].mean() >= agreement


def test_int8_greedy_mostly_agrees(make_ckpt):
    directory = make_ckpt("gemma")
    exact = polylm.load(directory, backend="torch").generate([1, 5, 9, 44], max_new_tokens=16)
    quantized = polylm.load(directory, backend="torch", quantize="int8").generate([1, 5, 9, 44], max_new_tokens=16)
    assert sum(a == b for a, b in zip(exact, quantized)) >= 14


def test_quantized_layers_hold_fewer_bytes(make_ckpt):
    from polylm_torch_common.parallel import param_bytes

    directory = make_ckpt("helium")
    sizes = {q: param_bytes(polylm.load(directory, backend="torch", quantize=q).runtime.params)
             for q in (None, "int8", "int4")}
    assert sizes["int4"] < sizes["int8"] < sizes[None]
