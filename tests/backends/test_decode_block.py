"""`CpuOps.block` — a decode step's whole block in one compiled call (`cpu_gemv` `DecodeBlock`) — computes exactly
what the runtime computes from `CpuOps`' single ops, bit for bit, and is taken where it applies: RMSNorm blocks with
a gated MLP (helium, gemma) or a token's routed experts (mixtral), fp32 and bf16, packed, int8 and int4 layers, one
row and two, one new token and three; it declines for a sliding-window ring, for routed experts of several
tokens and for blocks it does not cover (LayerNorm, an MLP without a gate)."""

from __future__ import annotations

import checkpoints
import numpy as np
import pytest
from polylm_torch.cpu_ops import CpuOps

import polylm
from polylm import testing
from polylm.backend import Step

MIXTRAL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, num_local_experts=6, num_experts_per_tok=2,
               rms_norm_eps=1e-2, rope_parameters={"rope_type": "default", "rope_theta": 100.0})


def directory(root, family: str, **overrides):
    if family == "mixtral":
        return testing.tiny_checkpoint(root, "mixtral", **{**MIXTRAL, "sliding_window": None, **overrides})
    return checkpoints.build(root, family, **overrides)


def run_steps(model: polylm.Model, rows: int) -> list[np.ndarray]:
    """All logits of a 5-token prefill, four one-token steps and a three-token step on `rows` rows."""
    runtime = model.runtime
    cache = runtime.new_cache(rows, 32)
    rng = np.random.default_rng(0)
    outputs, length = [], 0
    for new in (5, 1, 1, 1, 1, 3):
        ids = rng.integers(3, 60, (rows, new))
        length += new
        positions = np.tile(np.arange(length), (rows, 1))
        outputs.append(runtime.forward(Step(ids, positions, np.ones((rows, length), bool)), cache))
    return outputs


def fused_and_composed(model_dir, dtype: str, quantize: str | None, rows: int, monkeypatch
                       ) -> tuple[list[np.ndarray], list[np.ndarray], int]:
    """The steps' logits with the compiled blocks and without them, and how many blocks ran compiled."""
    taken = []
    block = CpuOps.block
    monkeypatch.setattr(CpuOps, "block", lambda *args: taken.append(block(*args)) or taken[-1])
    fused = run_steps(polylm.load(model_dir, backend="torch", dtype=dtype, quantize=quantize), rows)
    monkeypatch.setattr(CpuOps, "block", lambda *args: None)
    composed = run_steps(polylm.load(model_dir, backend="torch", dtype=dtype, quantize=quantize), rows)
    return fused, composed, sum(result is not None for result in taken)


@pytest.mark.parametrize("quantize", [None, "int8", "int4"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("family", ["helium", "gemma", "mixtral"])
def test_compiled_block_equals_the_composed_ops(ckpt_root, family, dtype, quantize, monkeypatch):
    rows = 1 if family == "mixtral" else 2  # routed experts go compiled for one token only
    fused, composed, taken = fused_and_composed(directory(ckpt_root, family), dtype, quantize, rows, monkeypatch)
    assert taken == 2 * (4 if family == "mixtral" else 6)  # two layers × the steps of one token (of ≤ 16: dense)
    for got, want in zip(fused, composed):
        assert np.array_equal(got, want)


@pytest.mark.parametrize("family, options, rows", [
    ("mixtral", {"sliding_window": 4}, 1),  # a ring: scattered cache slots
    ("mixtral", {}, 2),  # routed experts of two tokens
    ("bloom", {}, 1),  # LayerNorm, ALiBi, an MLP without a gate
])
def test_compiled_block_declines(ckpt_root, family, options, rows, monkeypatch):
    fused, composed, taken = fused_and_composed(directory(ckpt_root, family, **options), "float32", None, rows,
                                                monkeypatch)
    assert taken == 0
    for got, want in zip(fused, composed):
        assert np.array_equal(got, want)
