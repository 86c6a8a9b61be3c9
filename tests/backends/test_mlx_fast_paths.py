"""The MLX runtime's fast paths, each against the general path it replaces: a plain pass (no masked slot, no ring,
no ALiBi/softcap/sinks) attends with a causal or in-graph mask instead of core's bias, and on the CPU projections
are float32 copies that half-precision activations multiply bit-identically."""

from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest

import polylm
import polylm_mlx.runtime
from polylm import testing
from polylm.backend import Step
from polylm.ir import ALiBi
from polylm_mlx import ops, params

PROMPT = np.random.default_rng(0).integers(3, 90, (2, 9))
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256)


def run_steps(runtime, padded: bool, decode_steps: int = 3, gather_last: bool = True) -> list[np.ndarray]:
    """A prefill of PROMPT (row 1 left-padded by 3 slots when `padded`) and greedy-free decode steps feeding
    fixed ids; every pass's head outputs."""
    batch, new = PROMPT.shape
    total = new + decode_steps
    mask = np.ones((batch, total), dtype=bool)
    if padded:
        mask[1, :3] = False
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    cache = runtime.new_cache(batch, total)
    gather = np.full(batch, new - 1) if gather_last else np.array([new - 1, new - 2])
    outs = [runtime.forward(Step(PROMPT, positions[:, :new], mask[:, :new], gather), cache)]
    for t in range(decode_steps):
        end = new + t + 1
        outs.append(runtime.forward(Step(PROMPT[:, t:t + 1], positions[:, :end], mask[:, :end], np.zeros(batch, int)),
                                    cache))
    return outs


@pytest.fixture
def bias_calls(monkeypatch):
    """How many times the runtime asked core for an attention bias."""
    calls = []
    real = polylm_mlx.runtime.attention_bias
    monkeypatch.setattr(polylm_mlx.runtime, "attention_bias", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("family", ["helium", "gemma"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_plain_passes_take_the_fast_path_and_equal_the_bias_path(make_ckpt, bias_calls, family, dtype):
    runtime = polylm.load(make_ckpt(family), backend="mlx", dtype=dtype).runtime
    assert runtime.plain
    fast = run_steps(runtime, padded=False)
    assert bias_calls == []  # prefill and every decode step: no bias made on the host
    runtime.plain = False  # the general path, on the same weights
    general = run_steps(runtime, padded=False)
    assert len(bias_calls) == len(general)
    for a, b in zip(fast, general):
        assert np.abs(a - b).max() == 0.0


def test_padded_rows_and_other_gathers_keep_the_bias(make_ckpt, bias_calls):
    runtime = polylm.load(make_ckpt("helium"), backend="mlx").runtime
    padded = run_steps(runtime, padded=True)
    assert len(bias_calls) == len(padded)  # every pass sees a masked slot
    bias_calls.clear()
    other = run_steps(runtime, padded=False, gather_last=False)
    assert len(bias_calls) == 1  # the prefill gathers a slot before the last; decode steps are plain
    runtime.plain = False
    general = run_steps(runtime, padded=False, gather_last=False)
    for a, b in zip(other, general):
        assert np.abs(a - b).max() == 0.0


def test_rings_keep_the_bias(tmp_path, bias_calls):
    directory = testing.tiny_checkpoint(tmp_path, "mistral", "causal-lm", **SMALL, sliding_window=4)
    runtime = polylm.load(directory, backend="mlx").runtime
    assert runtime.plain  # the model could go plain; its rings (window 4 < the cache) make every pass general
    outs = run_steps(runtime, padded=False)
    assert len(bias_calls) == len(outs)


def test_alibi_softcap_and_sinks_are_never_plain(make_ckpt):
    ir = polylm.load(make_ckpt("helium"), backend="mlx").ir
    assert polylm_mlx.runtime.plain_visibility(ir)
    attention = ir.block.attention
    for changed in (replace(attention, softcap=30.0), replace(attention, sinks=True),
                    replace(attention, position=ALiBi())):
        # one layer of two is enough to leave the fast path
        blocks = [ir.block, replace(ir.block, attention=changed)]
        assert not polylm_mlx.runtime.plain_visibility(ir.with_layers(blocks))


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
@pytest.mark.parametrize("rows", [1, 7, 40])
def test_float32_projection_equals_half_precision_matmul(dtype, rows):
    """The CPU layout (`params`): a float32 [in, out] copy — whole, or in column halves on two streams — gives
    what MLX's half-precision matmul gives, bit for bit, with and without a bias."""
    mx.random.seed(rows)
    x = mx.random.normal((rows, 96)).astype(dtype)
    stored = (mx.random.normal((80, 96)) * 0.1).astype(dtype)  # [out, in]
    bias = mx.random.normal((80,)).astype(dtype)
    halves = params._matrix(stored, None, "w")
    assert isinstance(halves, params.Halves) and halves.left.shape == halves.right.shape == (96, 40)
    for copy in (mx.contiguous(stored.astype(mx.float32).T), halves):
        assert ops.linear(x, copy).dtype == dtype
        assert mx.array_equal(ops.linear(x, copy), x @ stored.T).item()
        assert mx.array_equal(ops.linear(x, copy, bias), mx.addmm(bias, x, stored.T)).item()


def test_cpu_projections_are_contiguous_float32_halves(make_ckpt):
    model = polylm.load(make_ckpt("gemma"), backend="mlx", dtype="bfloat16")  # tied head
    found = model.runtime.params
    assert found.embed.dtype == mx.bfloat16
    for matrix in (found.head, found.layers[0].qkv, found.layers[0].down):
        assert isinstance(matrix, params.Halves)
        for half in (matrix.left, matrix.right):
            assert half.dtype == mx.float32 and np.array(half).flags["C_CONTIGUOUS"]
    whole = np.concatenate([np.array(found.head.left), np.array(found.head.right)], axis=-1)
    np.testing.assert_array_equal(whole, np.array(found.embed.astype(mx.float32)).T)
