"""Each Triton kernel against the plain-torch reference op (`ReferenceOps`) over awkward shapes.

Under the interpreter (the default here, see conftest) only float32 runs; on a CUDA GPU
(`TRITON_INTERPRET=0`) float16 and bfloat16 run too, against the float32 reference with a looser tolerance.
Shapes are tiny: the interpreter executes every program in Python.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dataclasses import replace

import polylm.backend
from polylm.backend import Ring, Step
from polylm.ir import ALiBi, Attention, MLP, Norm, RoPE
from polylm.numerics.masks import attention_bias, ring_bias, ring_keys
from polylm.numerics.positions import alibi_slopes, rope_frequencies_per_row
from polylm_torch_common.ops import ReferenceOps, StepTensors
from polylm_torch_common.params import NormParams
from polylm_triton import interpreting
from polylm_triton.attention import attention as triton_attention
from polylm_triton.ops import TritonOps

DEVICE = "cpu" if interpreting() else "cuda"
# float32 everywhere; on a GPU the 16-bit dtypes too. (absolute, relative) tolerance against the reference op
# run in the same dtype: the kernels compute in float32 and round once, torch rounds after each op.
TOLERANCE = {torch.float32: (2e-5, 1e-5), torch.float16: (1e-2, 1e-2), torch.bfloat16: (5e-2, 2e-2)}
DTYPES = [torch.float32] if interpreting() else [torch.float32, torch.float16, torch.bfloat16]

DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}

REFERENCE, TRITON = ReferenceOps(), TritonOps()


def close(got, expected, dtype):
    assert torch.isfinite(got).all()
    absolute, relative = TOLERANCE[dtype]
    excess = (got.float() - expected.float()).abs() - relative * expected.float().abs()
    assert excess.max().item() <= absolute, excess.max().item()


def random(*shape, dtype=torch.float32, scale=1.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=generator) * scale).to(device=DEVICE, dtype=dtype)


def norm_params(kind, hidden, dtype, bias=False, offset=0.0, seed=1):
    spec = Norm(kind, 1e-5, weight_offset=offset, bias=bias)
    weight = random(hidden, seed=seed, scale=0.3).float() + offset  # as polylm_torch_common.params does
    if kind == "layer":
        weight = weight.to(dtype)
    return NormParams(spec, weight, random(hidden, seed=seed + 1, dtype=dtype) if bias else None)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind,bias,offset", [("rms", False, 0.0), ("rms", True, 1.0), ("layer", True, 0.0),
                                              ("layer", False, 1.0)])
@pytest.mark.parametrize("rows,hidden", [(1, 64), (7, 80), (5, 33)])
@pytest.mark.parametrize("with_delta", [False, True])
def test_add_norm(dtype, kind, bias, offset, rows, hidden, with_delta):
    x = random(rows, hidden, dtype=dtype, scale=2.0)
    delta = random(rows, hidden, dtype=dtype, seed=3) if with_delta else None
    p = norm_params(kind, hidden, dtype, bias, offset)
    got_sum, got = TRITON.add_norm(x, delta, p)
    ref_sum, ref = REFERENCE.add_norm(x, delta, p)
    close(got_sum, ref_sum, dtype)
    close(got, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale,norm", [(1.0, None), (8.0, None), (1.0, "layer"), (8.0, "rms")])
def test_embed(dtype, scale, norm):
    table = random(50, 48, dtype=dtype)
    ids = torch.tensor([[3, 49, 0], [7, 7, 12]], device=DEVICE)
    p = norm_params(norm, 48, dtype, bias=norm == "layer") if norm else None
    scale = float(torch.tensor(scale, dtype=dtype))
    close(TRITON.embed(ids, table, scale, p), REFERENCE.embed(ids, table, scale, p), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh", "gelu", "relu", "relu2"])
@pytest.mark.parametrize("gated", [True, False])
def test_activation(dtype, activation, gated):
    mlp = MLP(37, activation, gated)
    h = random(2, 3, 2 * 37 if gated else 37, dtype=dtype, scale=3.0)
    close(TRITON.activation(h, mlp), REFERENCE.activation(h, mlp), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gather(dtype):
    x = random(3, 5, 40, dtype=dtype)
    index = torch.tensor([4, 0, 2], device=DEVICE)
    assert torch.equal(TRITON.gather(x, index), REFERENCE.gather(x, index))


# -- attention-side kernels: steps over a padded batch -------------------------------------------------------

def attention_ir(heads, kv_heads, head_dim, position="rope", fraction=1.0, interleaved=False):
    pos = ALiBi() if position == "alibi" else RoPE(10000.0, 256, rotary_fraction=fraction, interleaved=interleaved)
    return Attention(heads, kv_heads, head_dim, pos)


def padded_mask(lengths, keys, sides):
    """[batch, keys] masks: row i holds lengths[i] real slots at its side ("left", "right")."""
    mask = np.zeros((len(lengths), keys), dtype=bool)
    for row, (length, side) in enumerate(zip(lengths, sides)):
        if side == "left":
            mask[row, keys - length:] = True
        else:
            mask[row, :length] = True
    return mask


def step_tensors(attn, mask, past, dtype):
    """StepTensors for the slots [past, keys) of `mask`, as TorchRuntime.upload builds them: the reference ops
    attend with core's visibility rule (`polylm.numerics.masks.attention_bias`), so every attention test below
    proves the Triton kernel's in-kernel rule equal to it (padded rows, ALiBi, prefill and decode)."""
    keys = mask.shape[1]
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    step = Step(np.zeros((mask.shape[0], keys - past), dtype=np.int64), positions, mask)
    inv_freq, factor = (rope_frequencies_per_row(attn, positions[:, past:]) if attn.rotary_dim else (None, 1.0))
    put = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(DEVICE)  # noqa: E731
    return StepTensors(
        input_ids=put(step.input_ids), positions=put(positions), new_positions=put(positions[:, past:]),
        mask=put(mask), slots=torch.arange(past, keys, dtype=torch.int32, device=DEVICE), gather=None,
        frequencies={attn.position: (put(inv_freq), factor)} if inv_freq is not None else {},
        alibi=put(alibi_slopes(attn)) if isinstance(attn.position, ALiBi) else None, past=past, dtype=dtype,
        attention_bias=put(attention_bias(attn, positions, mask, past, DTYPE_NAMES[dtype])).to(dtype))


def rotary(step):
    if not step.frequencies:
        return None
    (inv_freq, factor), = step.frequencies.values()
    angles = step.new_positions.float()[..., None] * inv_freq[:, None, :]
    return angles.cos() * factor, angles.sin() * factor


ROPE_CASES = [  # heads, kv_heads, head_dim, position, rotary fraction, interleaved
    (4, 2, 64, "rope", 1.0, False),
    (4, 2, 80, "rope", 0.5, False),
    (2, 1, 96, "rope", 0.25, True),
    (2, 2, 256, "rope", 1.0, True),
    (3, 3, 80, "alibi", 1.0, False),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,head_dim,position,fraction,interleaved", ROPE_CASES)
@pytest.mark.parametrize("past", [0, 3])
def test_rope_and_cache(dtype, heads, kv_heads, head_dim, position, fraction, interleaved, past):
    attn = attention_ir(heads, kv_heads, head_dim, position, fraction, interleaved)
    mask = padded_mask([7, 4], 7, ["left", "right"])
    step = step_tensors(attn, mask, past, dtype)
    new = mask.shape[1] - past
    qkv = random(2, new, (heads + 2 * kv_heads) * head_dim, dtype=dtype)
    caches = {}
    for name, ops in (("ref", REFERENCE), ("triton", TRITON)):
        keys = torch.full((2, kv_heads, 9, head_dim), 7.0, dtype=dtype, device=DEVICE)
        values = torch.full_like(keys, -7.0)
        caches[name] = (ops.rope_and_cache(qkv, keys, values, rotary(step), step, attn), keys, values)
    for got, expected in zip(caches["triton"], caches["ref"]):
        close(got, expected, dtype)


ATTENTION_CASES = [  # heads, kv_heads, head_dim, position
    (4, 2, 64, "rope"),  # GQA
    (4, 1, 80, "rope"),  # MQA, head_dim not a power of two
    (2, 2, 96, "alibi"),  # MHA with ALiBi
    (2, 1, 256, "rope"),  # Gemma-sized heads
]


def attention_inputs(heads, kv_heads, head_dim, position, mask, past, dtype, capacity=None):
    attn = attention_ir(heads, kv_heads, head_dim, position)
    step = step_tensors(attn, mask, past, dtype)
    batch, keys = mask.shape
    q = random(batch, heads, keys - past, head_dim, dtype=dtype, seed=5)
    cache_shape = (batch, kv_heads, capacity or keys + 2, head_dim)
    return attn, step, q, random(*cache_shape, dtype=dtype, seed=6), random(*cache_shape, dtype=dtype, seed=7)


def check_attention(got, expected, mask, past, dtype):
    """Compare rows whose query sees a key; rows that see none (padding) must merely be finite."""
    assert torch.isfinite(got).all()
    sees = torch.from_numpy(np.cumsum(mask, axis=1)[:, past:] > 0)  # a real slot at or before the query's
    close(got[sees], expected[sees], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,head_dim,position", ATTENTION_CASES)
@pytest.mark.parametrize("past", [0, 4])
def test_prefill_attention(dtype, heads, kv_heads, head_dim, position, past):
    # left padding, right padding, and a row with no real token at all
    mask = np.concatenate([padded_mask([9, 5], 11, ["left", "right"]), np.zeros((1, 11), dtype=bool)])
    attn, step, q, keys, values = attention_inputs(heads, kv_heads, head_dim, position, mask, past, dtype)
    got = TRITON.attention(q, keys, values, step, attn)
    check_attention(got, REFERENCE.attention(q, keys, values, step, attn), mask, past, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,head_dim,position", ATTENTION_CASES)
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_attention_split_kv(dtype, heads, kv_heads, head_dim, position, num_splits):
    # splits cover whole key blocks (64 keys; 32 for head_dim 256), so 150 keys make 3 splits
    mask = padded_mask([150, 97], 150, ["left", "left"])
    mask[1, 120] = False  # a hole: generation leaves none, but a step's mask may
    past = 149
    attn, step, q, keys, values = attention_inputs(heads, kv_heads, head_dim, position, mask, past, dtype,
                                                   capacity=160)
    got = triton_attention(q, keys, values, step.mask, step.positions, step.slots, step.alibi, attn,
                           num_splits=num_splits)
    check_attention(got, REFERENCE.attention(q, keys, values, step, attn), mask, past, dtype)


@pytest.mark.parametrize("num_splits", [1, 4])
def test_decode_attention_reads_only_filled_slots(num_splits):
    """Mask and positions sized to the whole cache (as under a CUDA graph): slots past the new token, even if
    marked real and full of garbage, are never read."""
    mask = padded_mask([12, 9], 12, ["left", "left"])
    capacity = 200  # 4 splits of 64 keys: all but the first are empty
    attn, step, q, keys, values = attention_inputs(4, 2, 64, "rope", mask, 11, torch.float32, capacity=capacity)
    expected = REFERENCE.attention(q, keys, values, step, attn)
    keys[:, :, 12:], values[:, :, 12:] = float("nan"), float("nan")
    wide_mask = torch.ones((2, capacity), dtype=torch.bool, device=DEVICE)
    wide_mask[:, :12] = step.mask
    wide_positions = torch.zeros((2, capacity), dtype=torch.int64, device=DEVICE)
    wide_positions[:, :12] = step.positions
    got = triton_attention(q, keys, values, wide_mask, wide_positions, step.slots, None, attn, num_splits=num_splits)
    close(got, expected, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,head_dim,position", ATTENTION_CASES)
@pytest.mark.parametrize("new", [1, 3])
def test_ring_cache_writes_and_attention(monkeypatch, dtype, heads, kv_heads, head_dim, position, new):
    """A sliding-window layer (window 5) on a ring of 7 slots that has wrapped: the kernels write each row's own
    ring slots (masked slots to the spare one) and attend as core's ring rule (`ring_bias`) says, for a
    left-padded row with a masked slot among its tokens, as the scheduler makes them."""
    monkeypatch.setattr(polylm.backend, "PASS_LIMIT", 3)
    attn = replace(attention_ir(heads, kv_heads, head_dim, position), window=5)
    mask = padded_mask([14, 9], 14, ["left", "left"])
    mask[1, 14 - new] = False
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    ring, past = Ring.new(5, 2, capacity=100), 14 - new
    for start in range(0, past, 3):
        end = min(start + 3, past)
        ring.write(Step(np.zeros((2, end - start), np.int64), positions[:, :end], mask[:, :end]), start)
    part = ring.write(Step(np.zeros((2, new), np.int64), positions, mask), past)
    key_positions, real = ring_keys(positions, mask, part)
    step = replace(step_tensors(attn, mask, past, dtype), ring_slots=torch.from_numpy(part.slots).to(DEVICE),
                   ring_positions=torch.from_numpy(key_positions).to(DEVICE), ring_mask=torch.from_numpy(real).to(DEVICE),
                   attention_bias=torch.from_numpy(ring_bias(attn, positions, mask, past, part, DTYPE_NAMES[dtype])
                                                   ).to(device=DEVICE, dtype=dtype))
    qkv = random(2, new, (heads + 2 * kv_heads) * head_dim, dtype=dtype, seed=3)
    caches = {}
    for name, ops in (("triton", TRITON), ("reference", REFERENCE)):
        keys, values = (random(2, kv_heads, ring.size + 1, head_dim, dtype=dtype, seed=s) for s in (6, 7))
        q = ops.rope_and_cache(qkv, keys, values, rotary(step), step, attn)
        caches[name] = (ops.attention(q, keys, values, step, attn), keys[:, :, :ring.size], values[:, :, :ring.size])
    (got, *got_cache), (expected, *expected_cache) = caches["triton"], caches["reference"]
    for a, b in zip(got_cache, expected_cache):  # the spare slot's content is whichever masked write came last
        close(a, b, dtype)
    sees = torch.from_numpy(mask[:, past:])
    close(got[sees], expected[sees], dtype)


def test_kernels_compile_for_cuda_without_a_gpu():
    """What the interpreter cannot check: every kernel, at the launchers' pinned configurations, compiles for
    sm_90 (Triton to PTX, ptxas to a cubin) and fits a consumer GPU's 99 KB of shared memory."""
    script = Path(__file__).resolve().parents[2] / "scripts" / "triton_aot.py"
    result = subprocess.run([sys.executable, str(script), "--arch", "90", "--quick"],
                            env={**os.environ, "TRITON_INTERPRET": "0"}, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
