"""polylm_torch.cpu_gemv: the compiled small-M kernels against fp64 references, per ISA, plus the fallback.

Tolerances, stated once: fp32 activations are checked elementwise to ``|y - ref| <= 1e-5 * (|ref| + max|ref|)``
against an fp64 ``F.linear`` with the very weights the layer holds (bf16-rounded, or dequantized); bf16
outputs are only as exact as bf16 rounding (2^-8 relative).
"""

from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

try:
    from polylm_torch import cpu_gemv
except ImportError:  # not installed (pip install -e .): import from the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "backends"))
    from polylm_torch import cpu_gemv

from polylm.ir import Quantization
from polylm.numerics import quantization
from polylm_torch.cpu_gemv import MAX_KERNEL_ROWS, Int4Linear, Int8Linear, PackedLinear, _build, _layout

FP32_RTOL = 1e-5
BF16_RTOL = 2.0**-8
# (out_features N, in_features K): odd N, K not a multiple of 16/32, a single row, a full block, 2 KB rows.
SHAPES = [(1, 1), (7, 45), (37, 33), (16, 64), (129, 1000), (48, 1040)]
ROWS = [1, 2, 3, 5, 17, 40]  # 5: padded to 8 rows (one 8-row pass, or two of 4 on AVX2); 17: padded to 20 (16 + 4 or
# five 4-row passes); 40 > MAX_KERNEL_ROWS (32): the large-M path


def _assert_close(y: torch.Tensor, ref: torch.Tensor, rtol: float) -> None:
    assert y.shape == ref.shape
    err = (y.double() - ref).abs()
    bound = rtol * (ref.abs() + ref.abs().max())
    worst = (err / bound.clamp_min(1e-300)).max().item() if err.numel() else 0.0
    assert worst <= 1.0, f"error {worst:.3g}x the bound (rtol={rtol:g}); max abs error {err.max().item():.3g}"


def _ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x.double(), weight.double(), None if bias is None else bias.double())


def _rtol(x: torch.Tensor, rows: int, max_kernel_rows: int = MAX_KERNEL_ROWS) -> float:
    if x.dtype == torch.bfloat16:
        # bf16 output rounding; the large-M path may also multiply in bf16 (weights rounded for int8/int4).
        return BF16_RTOL if rows <= max_kernel_rows else 4 * BF16_RTOL
    return FP32_RTOL


@pytest.fixture(scope="module")
def extension():
    ok, reason = cpu_gemv.available()
    assert ok, f"the kernels should build on this machine: {reason}"
    module, _ = _build.load()
    return module


def _isas() -> list[str]:
    """The kernel paths this CPU runs (both on AVX-512 machines: the AVX2 path is forced there too)."""
    module, _ = _build.load()
    return _build.supported_isas(module) if module is not None else []


@pytest.fixture(params=_isas())
def isa(request, extension, monkeypatch) -> str:
    monkeypatch.setenv("POLYLM_GEMV_ISA", request.param)
    return request.param


# ----------------------------------------------------------------------------------------------- float weights
@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_packed_linear_matches_fp64(isa, wdtype, shape):
    n, k = shape
    gen = torch.Generator().manual_seed(n * 1000 + k)
    weight = torch.randn(n, k, generator=gen).to(wdtype)
    bias = torch.randn(n, generator=gen) if n % 2 else None
    layer = PackedLinear(weight, bias)
    assert layer.isa == isa
    assert torch.equal(layer.weight, weight)
    for rows in ROWS:
        for xdtype in (torch.float32, torch.bfloat16):
            x = torch.randn(rows, k, generator=gen).to(xdtype)
            y = layer(x)
            assert y.dtype == xdtype
            _assert_close(y, _ref(x, weight, bias), _rtol(x, rows))


@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_packed_rows_are_weight_rows(isa, wdtype, shape):
    n, k = shape
    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(n + k)).to(wdtype)
    ids = torch.tensor([[0, n - 1, n // 2], [n - 1, 0, n * 7 // 11]])  # first, last, repeated, any shape
    layer = PackedLinear(weight)
    for chosen in (ids, ids[:, :0], ids[0, 1]):
        assert torch.equal(layer.rows(chosen), weight[chosen])


def test_packed_linear_3d_input_and_multi_pass(isa):
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(50, 77, generator=gen).to(torch.bfloat16)
    bias = torch.randn(50, generator=gen)
    x = torch.randn(2, 3, 77, generator=gen)  # M = 6
    for max_rows in (4, 8):  # the tiled path, then the kernel (6 rows padded to 8: one 8-row pass or two of 4)
        y = PackedLinear(weight, bias, max_kernel_rows=max_rows)(x)
        assert y.shape == (2, 3, 50)
        _assert_close(y, _ref(x, weight, bias), FP32_RTOL)
    y = PackedLinear(weight, bias)(x[:1, :2])  # [1, 2, K]: the kernel
    _assert_close(y, _ref(x[:1, :2], weight, bias), FP32_RTOL)


@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float16, torch.float32])
def test_kernel_rows_do_not_depend_on_batch(isa, wdtype):
    # Each row's sum runs in the same k order whatever the pass sizes (16, 8, 4, 2, 1 rows): bit-identical rows.
    gen = torch.Generator().manual_seed(3)
    layer = PackedLinear(torch.randn(100, 70, generator=gen).to(wdtype), torch.randn(100, generator=gen))
    for xdtype in (torch.float32, torch.bfloat16):
        x = torch.randn(MAX_KERNEL_ROWS, 70, generator=gen).to(xdtype)
        single = torch.cat([layer(x[m:m + 1]) for m in range(MAX_KERNEL_ROWS)])
        for rows in range(2, MAX_KERNEL_ROWS + 1):
            assert torch.equal(layer(x[:rows]), single[:rows]), (xdtype, rows)


def test_packed_linear_empty_and_bad_input(isa):
    layer = PackedLinear(torch.randn(8, 20))
    assert layer(torch.randn(0, 20)).shape == (0, 8)
    with pytest.raises(ValueError, match="last dimension"):
        layer(torch.randn(1, 21))
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        layer(torch.randn(1, 20, dtype=torch.float64))


def test_results_do_not_depend_on_thread_count(isa):
    weight = torch.randn(1000, 300).to(torch.bfloat16)
    x = torch.randn(1, 300)
    layers = [PackedLinear(weight), Int8Linear.from_float(weight), Int4Linear.from_float(weight)]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = [layer(x) for layer in layers]
        torch.set_num_threads(2)
        double = [layer(x) for layer in layers]
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(single, double):
        assert torch.equal(a, b)


def test_nan_in_input_propagates(isa):
    weight = torch.randn(20, 40)
    x = torch.randn(2, 40)
    x[1, 3] = math.nan
    for layer in (PackedLinear(weight), Int8Linear.from_float(weight), Int4Linear.from_float(weight)):
        y = layer(x)
        assert torch.isfinite(y[0]).all() and torch.isnan(y[1]).all()


def test_float_layout_roundtrip():
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        weight = torch.randn(37, 45).to(dtype)
        packed = _layout.pack_float(weight)
        chunks = -(-45 // _layout.float_chunk_k(dtype))
        assert packed.shape[:2] == (3, chunks) and packed[0, 0].numel() * packed.element_size() == 64
        assert torch.equal(_layout.gather_rows(packed, 45, torch.arange(37)), weight)


# ------------------------------------------------------------------------------------------- quantized weights
@pytest.mark.parametrize("group_size", [None, 16, 64])
@pytest.mark.parametrize("shape", SHAPES)
def test_int8_matches_dequantized_reference(isa, shape, group_size):
    n, k = shape
    gen = torch.Generator().manual_seed(n + 7 * k)
    weight = torch.randn(n, k, generator=gen)
    bias = torch.randn(n, generator=gen) if n % 2 else None
    layer = Int8Linear.from_float(weight.to(torch.bfloat16), bias, group_size=group_size)
    reference = quantization.quantize(weight.to(torch.bfloat16).float().numpy(), Quantization(8, group_size))
    dequantized = layer.dequantize()
    assert torch.equal(dequantized, torch.from_numpy(reference.dequantize()))
    assert (dequantized - weight.to(torch.bfloat16).float()).abs().max() <= reference.scales.max() / 2 + 1e-6
    for rows in ROWS:
        for xdtype in (torch.float32, torch.bfloat16):
            x = torch.randn(rows, k, generator=gen).to(xdtype)
            _assert_close(layer(x), _ref(x, dequantized, bias), _rtol(x, rows))


@pytest.mark.parametrize("group_size", [32, 128])
@pytest.mark.parametrize("shape", SHAPES)
def test_int4_matches_dequantized_reference(isa, shape, group_size):
    n, k = shape
    gen = torch.Generator().manual_seed(3 * n + k)
    weight = torch.randn(n, k, generator=gen) + 0.5  # off-centre: the largest |w| of a group is one-sided
    bias = torch.randn(n, generator=gen) if n % 2 else None
    layer = Int4Linear.from_float(weight, bias, group_size=group_size)
    reference = quantization.quantize(weight.numpy(), Quantization(4, group_size))
    dequantized = layer.dequantize()
    assert torch.equal(dequantized, torch.from_numpy(reference.dequantize()))
    # half a step, plus what the bf16 rounding of the scale costs at the clamp (at most 7 · 2^-9 of a step)
    assert (dequantized - weight).abs().max() <= reference.scales.max() * (0.5 + 7 * 2.0**-9)
    for rows in ROWS:
        for xdtype in (torch.float32, torch.bfloat16):
            x = torch.randn(rows, k, generator=gen).to(xdtype)
            _assert_close(layer(x), _ref(x, dequantized, bias), _rtol(x, rows))


def test_quantized_activations_with_outliers(isa):
    """The VNNI path turns x into 24-bit fixed point per row: a 1000x outlier must not cost the rest."""
    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(64, 512, generator=gen)
    x = torch.randn(1, 512, generator=gen)
    x[0, 7] = 1000.0
    x[0, 8:40] *= 1e-3
    for layer in (Int8Linear.from_float(weight), Int4Linear.from_float(weight)):
        _assert_close(layer(x), _ref(x, layer.dequantize(), None), FP32_RTOL)


def test_quantized_constructor_checks():
    with pytest.raises(ValueError, match="multiple of 16"):
        Int4Linear.from_float(torch.randn(4, 64), group_size=24)
    with pytest.raises(ValueError, match=r"-8\.\.7, found 8\.\.8"):
        Int4Linear(torch.full((4, 32), 8, dtype=torch.int8), torch.ones(4, 1), group_size=32)
    with pytest.raises(ValueError, match="scales must have shape"):
        Int8Linear(torch.zeros(4, 32, dtype=torch.int8), torch.ones(4, 2))
    with pytest.raises(TypeError, match="dtype"):
        PackedLinear(torch.zeros(4, 4, dtype=torch.float64))


# ----------------------------------------------------------------------------------------------- the fallback
def test_forced_fallback_matches(monkeypatch):
    monkeypatch.setenv("POLYLM_GEMV_ISA", "none")
    ok, reason = cpu_gemv.available()
    assert not ok and "POLYLM_GEMV_ISA" in reason
    gen = torch.Generator().manual_seed(11)
    weight = torch.randn(37, 45, generator=gen).to(torch.bfloat16)
    bias = torch.randn(37, generator=gen)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an explicit "none" is not worth a warning
        layers = [PackedLinear(weight, bias), Int8Linear.from_float(weight, bias, group_size=16),
                  Int4Linear.from_float(weight, bias)]
    for layer in layers:
        assert layer.isa == "torch"
    ids = torch.tensor([[36, 0, 36]])
    assert torch.equal(layers[0].rows(ids), weight[ids])
    for rows in (1, 6):
        for xdtype in (torch.float32, torch.bfloat16):
            x = torch.randn(rows, 45, generator=gen).to(xdtype)
            refs = [weight, layers[1].dequantize(), layers[2].dequantize()]
            for layer, w in zip(layers, refs):
                _assert_close(layer(x), _ref(x, w, bias), BF16_RTOL if xdtype == torch.bfloat16 else FP32_RTOL)


def test_build_failure_falls_back_with_one_warning(monkeypatch, tmp_path):
    monkeypatch.setenv("POLYLM_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.delenv("POLYLM_GEMV_ISA", raising=False)
    monkeypatch.setattr(cpu_gemv, "_warned", False)
    _build.reset()
    try:
        ok, reason = cpu_gemv.available()
        assert not ok and "compiler" in reason
        weight = torch.randn(9, 20)
        with pytest.warns(UserWarning, match="compiler") as record:
            layer = PackedLinear(weight)
            Int8Linear.from_float(weight)
        assert len(record) == 1
        x = torch.randn(2, 20)
        _assert_close(layer(x), _ref(x, weight, None), FP32_RTOL)
    finally:
        _build.reset()
    assert not any(tmp_path.iterdir()), "nothing is built without a compiler"


# ------------------------------------------------------------------------------------------------ build cache
def test_build_cache_key_and_location(extension, monkeypatch, tmp_path):
    key = _build.build_key("g++ 12")
    assert key == _build.build_key("g++ 12")
    assert key != _build.build_key("g++ 13")
    monkeypatch.setattr(_build, "cpu_flags", lambda: frozenset({"avx2", "fma", "f16c"}))
    assert _build.build_key("g++ 12") != key, "the cache must be keyed by CPU features"
    built = Path(extension.__file__).resolve()
    assert not built.is_relative_to(Path(cpu_gemv.__file__).resolve().parent), "never build into the sources"
    monkeypatch.setenv("POLYLM_CACHE_DIR", str(tmp_path))
    assert _build.cache_root() == tmp_path / "kernels"
