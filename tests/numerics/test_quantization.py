"""The quantization reference (`polylm.numerics.quantization`) against hand-computed cases, and every backend
holding exactly its codes and scales: the same checkpoint quantized on torch, MLX and Triton, read back from each
backend's packed layout, gives bit-identical integer codes and scales."""

import numpy as np
import pytest
import torch

import polylm
from polylm.ir import Quantization
from polylm.numerics.quantization import QuantizedArrays, quantize, round_to_bfloat16

INT8, INT4 = Quantization(8), Quantization(4, group_size=32)


# -- the reference ------------------------------------------------------------------------------------------

def test_scale_dtype_is_one_rule_per_bit_width():
    assert INT8.scale_dtype == Quantization(8, group_size=64).scale_dtype == "float32"
    assert INT4.scale_dtype == Quantization(4, group_size=128).scale_dtype == "bfloat16"
    assert (INT8.qmax, INT4.qmax) == (127, 7)


def test_int8_per_row_with_ties_and_a_zero_row():
    weight = np.array([[127.0, -63.5, 0.5, 1.5, -2.5, 0.0],  # scale 1: ties round to even
                       [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # all zero: scale 0, q 0
                       [-0.7, 0.3, 0.0, 0.0, 0.0, 0.1]], dtype=np.float32)
    result = quantize(weight, INT8)
    scale = np.float32(0.7) / np.float32(127)  # float32, not rounded further
    np.testing.assert_array_equal(result.scales, np.array([[1.0], [0.0], [scale]], dtype=np.float32))
    assert result.scales.dtype == np.float32 and result.group_size == 6
    np.testing.assert_array_equal(result.codes, np.array([[127, -64, 0, 2, -2, 0],
                                                          [0, 0, 0, 0, 0, 0],
                                                          [-127, 54, 0, 0, 0, 18]]))  # 54.43, 18.14
    assert result.codes.dtype == np.int8


def test_int4_groups_of_32_with_a_partial_last_group_and_bf16_scales():
    weight = np.zeros((1, 40), dtype=np.float32)
    weight[0, :6] = [14.0, -3.0, 1.0, 5.0, 7.0, -14.0]  # scale 2: −1.5, 0.5, 2.5, 3.5 round to even
    weight[0, 32:35] = [0.7, -0.35, 0.05]  # the 8-feature last group: scale 0.1, stored as bf16
    result = quantize(weight, INT4)
    bf16_tenth = 0.10009765625  # 0x3DCD: 0.1 (0x3DCCCCCD) rounded to bf16, up
    np.testing.assert_array_equal(result.scales, np.array([[2.0, bf16_tenth]], dtype=np.float32))
    expected = np.zeros(40, dtype=np.int8)
    expected[:6] = [7, -2, 0, 2, 4, -7]
    expected[32:35] = [7, -3, 0]  # against the stored scale: 0.7 / 0.10009… = 6.99, 0.35 / 0.10009… = 3.497
    np.testing.assert_array_equal(result.codes[0], expected)
    # the partial group is quantized as its zero-padded group would be
    padded = quantize(np.pad(weight, ((0, 0), (0, 24))), INT4)
    np.testing.assert_array_equal(padded.codes[:, :40], result.codes)
    np.testing.assert_array_equal(padded.scales, result.scales)


def test_int4_groups_of_64():
    weight = np.tile(np.float32([3.5, -1.75, 0.25, 0.75]), (2, 32))  # [2, 128]: two groups a row
    weight[1, 64:] *= 2
    result = quantize(weight, Quantization(4, group_size=64))
    np.testing.assert_array_equal(result.scales, np.array([[0.5, 0.5], [0.5, 1.0]], dtype=np.float32))
    np.testing.assert_array_equal(result.codes[0, :4], [7, -4, 0, 2])  # 7, −3.5, 0.5, 1.5 rounded to even
    np.testing.assert_array_equal(result.codes, np.tile(np.int8([7, -4, 0, 2]), (2, 32)))
    np.testing.assert_array_equal(result.dequantize()[0, :4], [3.5, -2.0, 0.0, 1.0])


def test_bfloat16_rounding_is_to_nearest_even():
    ulp = 2.0 ** -7  # bf16 keeps 7 fraction bits
    values = np.array([1 + ulp / 2, 1 + 3 * ulp / 2, 1 + ulp / 2 + 2.0 ** -20, -(1 + 3 * ulp / 2), 0.0, np.inf,
                       np.nan], dtype=np.float32)
    rounded = round_to_bfloat16(values)
    np.testing.assert_array_equal(rounded[:6], [1.0, 1 + 2 * ulp, 1 + ulp, -(1 + 2 * ulp), 0.0, np.inf])
    assert np.isnan(rounded[6])
    rng = np.random.default_rng(0)
    wide = (rng.normal(size=4096) * 10.0 ** rng.uniform(-20, 20, size=4096)).astype(np.float32)
    np.testing.assert_array_equal(round_to_bfloat16(wide), torch.from_numpy(wide).bfloat16().float().numpy())


@pytest.mark.parametrize("spec", [INT8, INT4, Quantization(8, group_size=48), Quantization(4, group_size=64)],
                         ids=["int8", "int4", "int8-g48", "int4-g64"])
def test_error_is_half_a_step_and_blocks_do_not_change_results(spec, monkeypatch):
    from polylm.numerics import quantization

    weight = np.random.default_rng(1).normal(size=(300, 200)).astype(np.float32)
    whole = quantize(weight, spec)
    group = whole.group_size
    steps = np.repeat(whole.scales, group, axis=1)[:, :200]
    # half a step, and the clamp where a bf16 scale was rounded down (at most 7 · 2^-9 of a step)
    assert (np.abs(whole.dequantize() - weight) <= steps * (0.5 + 7 * 2.0 ** -9)).all()
    assert np.abs(whole.codes).max() == spec.qmax
    monkeypatch.setattr(quantization, "_BLOCK_ELEMENTS", 1000)  # a block of 5 rows, many on the pool
    blocked = quantize(weight, spec)
    np.testing.assert_array_equal(blocked.codes, whole.codes)
    np.testing.assert_array_equal(blocked.scales, whole.scales)


# -- every backend stores the reference ---------------------------------------------------------------------

def _nibbles(data: np.ndarray) -> np.ndarray:
    """uint8 [..., n] of two codes each (the first in the low nibble) → [..., 2n]."""
    return np.stack((data & 0xF, data >> 4), axis=-1).reshape(*data.shape[:-1], -1)


def _torch_arrays(layer, groups: int) -> tuple[np.ndarray, np.ndarray]:
    """(codes, scales) read back from a cpu_gemv layer's packed blocks (layout in `_layout.py`); `groups` (the
    reference's scales a row) only matters to MLX, which repeats them."""
    codes, scales = layer._packed
    blocks, words, _ = codes.shape
    rows = codes.view(torch.int32).transpose(1, 2).reshape(blocks * 16, words).contiguous().view(torch.uint8)
    rows = rows.numpy().astype(np.int16)
    if layer.bits == 8:
        q = rows - 128
    else:  # byte i of word c: features 8c + i (low nibble) and 8c + 4 + i (high nibble)
        lanes = rows.reshape(blocks * 16, words, 4)
        q = np.concatenate((lanes & 0xF, lanes >> 4), axis=-1).reshape(blocks * 16, -1) - 8
    scales = scales.permute(0, 2, 1).reshape(blocks * 16, -1)
    assert scales.dtype == (torch.float32 if layer.bits == 8 else torch.bfloat16)
    return q[:layer.out_features, :layer.in_features], scales[:layer.out_features].float().numpy()


def _mlx_arrays(matrix, groups: int) -> tuple[np.ndarray, np.ndarray]:
    """(codes, scales) read back from an MLX `QuantizedMatrix` (affine uint32 words, scales repeated per MLX
    group, biases −offset · scales)."""
    import mlx.core as mx

    offset = 2 ** (matrix.bits - 1)
    data = np.array(matrix.weight).view(np.uint8)
    codes = (data if matrix.bits == 8 else _nibbles(data)).astype(np.int16) - offset
    scales = np.array(matrix.scales.astype(mx.float32))
    assert matrix.scales.dtype == (mx.float32 if matrix.bits == 8 else mx.bfloat16)
    np.testing.assert_array_equal(np.array(matrix.biases.astype(mx.float32)), -offset * scales)
    per_group = scales.reshape(scales.shape[0], groups, -1)
    assert (per_group == per_group[..., :1]).all()
    return codes[:, :matrix.in_features], per_group[..., 0]


def _triton_arrays(stored, groups: int) -> tuple[np.ndarray, np.ndarray]:
    """(codes, scales) read back from a Triton `QuantizedWeight` (int8, or uint8 nibbles q + 8)."""
    data = stored.data.cpu().numpy()
    codes = data if stored.bits == 8 else _nibbles(data).astype(np.int16)[:, :stored.in_features] - 8
    assert stored.scales.dtype == (torch.float32 if stored.bits == 8 else torch.bfloat16)
    return codes, stored.scales.float().cpu().numpy()


def _matrices(params) -> dict[str, object]:
    """The quantized (or, unquantized, the dense) projections of a params record by name; the head when untied."""
    found = {f"layers.{index}.{name}": getattr(layer, name)
             for index, layer in enumerate(params.layers) for name in ("qkv", "out", "up", "down")}
    found["head"] = params.head
    return found


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_every_backend_holds_the_reference_codes_and_scales(make_ckpt, bits, dtype):
    directory = make_ckpt("helium")  # an untied head: the head is quantized too
    spec = Quantization(8) if bits == "int8" else Quantization(4, group_size=32)
    dense = _matrices(polylm.load(directory, backend="torch", dtype=dtype).runtime.params)
    reference: dict[str, QuantizedArrays] = {name: quantize(layer.weight.float().numpy(), spec)
                                             for name, layer in dense.items()}
    read = {"torch": _torch_arrays, "mlx": _mlx_arrays, "triton": _triton_arrays}
    backends = ["torch", "mlx"] + (["triton"] if dtype != "bfloat16" else [])  # the interpreter has no bf16
    for backend in backends:
        held = _matrices(polylm.load(directory, backend=backend, dtype=dtype, quantize=bits).runtime.params)
        assert held.keys() == reference.keys()
        for name, matrix in held.items():
            codes, scales = read[backend](matrix, reference[name].scales.shape[1])
            np.testing.assert_array_equal(codes, reference[name].codes, err_msg=f"{backend} {name}")
            np.testing.assert_array_equal(scales, reference[name].scales, err_msg=f"{backend} {name}")
