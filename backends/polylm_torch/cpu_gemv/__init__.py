"""Compiled CPU kernels of the torch backend: matrix-vector products for decode (batch 1 / few rows), a bf16 GEMM for
prefill, and fused elementwise and decode-attention kernels.

Decode at batch 1 is bound by the bytes of weight read per token. These layers repack a linear layer's weight once, at
load, into blocks of 16 output rows that each form one contiguous stream (layout in ``_layout.py``), and run a
hand-written AVX-512 or AVX2 kernel that keeps several such streams in flight per thread on torch's own OpenMP pool.
``x`` with at most ``max_kernel_rows`` rows (default 32: a batched decode step) goes through the kernel with fp32
accumulation, passes of 16, 8 or 4 rows of x (AVX-512; AVX2: 4) on each cache-resident set of weight blocks, so the
weights are read once for all rows (measured on the AVX-512 machine: faster than ``F.linear`` and than the tiled path up
to 32 rows; on an AVX-512 machine without BF16, 24 matrices of gemma-bench's shapes at 32 rows took 250 ms in bf16 and
300 ms in fp32 through the kernel against 2600 ms and 460 ms through the tiled path). Larger ``x`` (prefill): with bf16
``x`` on a CPU with AVX512-BF16 and a bf16 or quantized weight, a register-tiled GEMM (6 rows of x by 64 output columns
per tile, ``vdpbf16ps``) runs straight on the packed bf16 blocks — int8/int4 blocks are dequantized to bf16 one L2-sized
panel at a time — at 430-460 GFLOP/s on 2 Zen 4 cores, 10-20% above ``F.linear`` (oneDNN) and at the measured
``vdpbf16ps`` peak of a core; otherwise (fp32/fp16 weights or x, AVX2 CPUs, where torch's bf16 matmul is emulated) a
tiled path unpacks about 2 MB of the weight at a time into a transposed fp32 tile and multiplies it with ``at::mm``.

:class:`FusedKernels` (made once per runtime by :func:`fused_kernels`) fuses a gated MLP's ``act(gate) * up``
(SiLU, tanh-GELU), a residual add with the RMSNorm after it, and the attention of a few query rows over the KV cache
(decode): fp32 math, one rounding, one pass instead of 5-9 torch ops or SDPA's ~300 µs a decode call. They are
written once (``fused.h``) and compiled for both ISAs. Its ``rope_and_cache`` (plain C++) splits the fused q/k/v
projection, rotates q and k and writes the KV cache with the very roundings of the torch ops, and its
``routed_experts`` makes a token's mixture-of-experts layer one call (router, routing, the chosen experts' kernel
layers, activation and weighted sum), and ``decode_block`` a decode step's whole block (these kernels in the
runtime's order, chained in C++: ~10 Python-to-C++ round trips a layer fewer; a 12-layer MoE's host work per
step 3.4 → 1.3 ms).

Memory: the packed copy *replaces* the original weight. A :class:`PackedLinear` keeps no reference to the tensor it
was built from (drop yours and its memory is freed); the only extra storage is row padding to a multiple of 16 and K
padding to 2 (bf16/fp16) — prefill reads the same packed bytes, and an embedding lookup gathers its rows from them
(:meth:`PackedLinear.rows`), so there is never a second full-size copy. bf16 and fp16 weights stay 2 bytes per value
(fp16 is *not* rounded to bf16: it is converted exactly with F16C); fp32 stays fp32. :class:`Int8Linear` stores 1
byte per weight plus one fp32 scale per row or per group; :class:`Int4Linear` stores half a byte per weight plus
one bf16 scale per group. Their ``from_float`` quantizes with the core reference (`polylm.numerics.quantization`)
and only packs its codes and scales. Only when the extension is unavailable do the layers keep the original (or
plainly quantized) tensors and use stock torch ops: ``F.linear`` for :class:`PackedLinear`, dequantize +
``F.linear`` for the others.

Numerics: the float kernels accumulate in fp32 (max |error| / max |y| against an fp64 reference with the same
weights: about 3e-6 at K = 4096). The int8/int4 kernels multiply exactly in integers: on AVX-512 (VNNI) each
activation row is turned into a 24-bit fixed-point number (three signed byte digits, one scale per row) and dotted
with ``vpdpbusd``; on AVX2 weights are converted to fp32 in registers. Both agree with ``F.linear(x,
layer.dequantize())`` to a few 1e-7..1e-6 (same measure).

Environment: ``POLYLM_GEMV_ISA`` = ``auto`` | ``avx512`` | ``avx2`` | ``none`` picks the code path of layers built
afterwards; ``POLYLM_GEMV_PREFETCH`` = ``0`` | ``1`` turns the AVX-512 decode kernels' software prefetch off or on
(default: on for Intel CPUs, where it was measured 10-15% faster, off for AMD, where it was 10-15% slower; read
once per process); ``POLYLM_CACHE_DIR`` moves the build cache; ``POLYLM_GEMV_VERBOSE=1`` shows the compiler. The
layers are for inference: they do not record autograd history.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

from polylm.backend import NormParams
from polylm.ir import Attention, MoE, Quantization
from polylm.numerics import quantization

from . import _build, _layout

__all__ = ["available", "MAX_KERNEL_ROWS", "fused_kernels", "FusedKernels", "PackedLinear", "Int8Linear",
           "Int4Linear"]

#: The most rows of x that go through the kernel (default of the layers' ``max_kernel_rows``).
MAX_KERNEL_ROWS = 32
_QUANT_KIND = {8: 0, 4: 1}  # QuantKind in kernels.h, by bits
_GATED = {"silu": 0, "gelu_tanh": 1}
_warned = False


def available() -> tuple[bool, str]:
    """Whether the compiled kernels can be used here (building them on first call), and why not if not."""
    module, isa, reason = _build.select_isa()
    return (module is not None and isa is not None), reason


class FusedKernels:
    """The compiled fused ops for the ISA that ``POLYLM_GEMV_ISA`` picked when this was made (:func:`fused_kernels`).
    Each op returns None where it does not apply — another device or dtype, no extension — and the caller then
    uses torch ops."""

    def __init__(self, module: object | None, isa: str | None) -> None:
        self._module = module
        self._isa = None if isa is None else _build.ISA_CODES[isa]

    def _applies(self, x: torch.Tensor, *caches: torch.Tensor) -> bool:
        """Whether the kernels serve CPU activations `x` and the KV caches `caches` (which they read or write in
        place: contiguous, of x's dtype)."""
        if self._module is None or x.dtype not in (torch.float32, torch.bfloat16) or not x.is_cpu:
            return False
        return all(cache.dtype == x.dtype and cache.is_contiguous() for cache in caches)

    def gated_activation(self, h: torch.Tensor, activation: str) -> torch.Tensor | None:
        """``act(gate) * up`` over the halves of h's last dimension (SiLU, tanh-GELU)."""
        if activation not in _GATED or not self._applies(h):
            return None
        return self._module.gated_activation(h.contiguous(), _GATED[activation], self._isa)

    def routed_experts(self, router: torch.Tensor, router_bias: torch.Tensor | None, ups: list, downs: list,
                       moe: MoE) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """A mixture-of-experts layer for one token as one compiled call (``RoutedExperts``): the router's logits
        (`router` packed here, rounded to x's dtype), the routing of `moe` (ties by lowest id), the chosen experts'
        kernel layers (`ups`, `downs`: one per expert, biases held by the layers) with SiLU/tanh-GELU gating, each
        output times its fp32 weight rounded to x's dtype and summed in it in the experts' order
        (`ReferenceOps.routed_experts`' roundings). None where it does not apply."""
        expert = moe.expert
        if (self._module is None or not expert.gated or expert.activation not in _GATED
                or router.dtype not in (torch.float32, torch.bfloat16) or not _compiled(*ups, *downs)):
            return None
        gate = PackedLinear(router, router_bias)
        if gate._impl is None:
            return None
        return self._module.RoutedExperts(gate._impl, [layer._impl for layer in ups], [layer._impl for layer in downs],
                                          moe.top_k, moe.routing == "softmax_topk", moe.normalize,
                                          _GATED[expert.activation], self._isa)

    def decode_block(self, attn_norm: NormParams, qkv, out, mlp_norm: NormParams, experts: object | None, up, down,
                     activation: str, attn: Attention) -> Callable | None:
        """A block of a decode step as one compiled call (``DecodeBlock``): RMSNorm (`attn_norm`), the q/k/v layer,
        RoPE and the cache write, attention, the output layer, residual add and RMSNorm (`mlp_norm`), then the
        compiled `experts` (`routed_experts`) or the gated dense MLP of kernel layers `up`, `down` (SiLU, tanh-GELU)
        — the calls `CpuOps` makes for such a block, in its order. Called with (x, delta, keys, values, cos, sin,
        attention bias, past, key slots), it returns the residual and the MLP output. None where it does not
        apply."""
        dense = experts is None
        if (self._module is None or attn.head_dim > 256 or (dense and activation not in _GATED)
                or not _compiled(qkv, out, *((up, down) if dense else ()))):
            return None

        def fp32(vector: torch.Tensor | None) -> torch.Tensor | None:
            return None if vector is None else vector.float().contiguous()
        rotary = attn.rotary_dim
        return self._module.DecodeBlock(
            fp32(attn_norm.weight), fp32(attn_norm.bias), attn_norm.spec.eps, qkv._impl, out._impl,
            fp32(mlp_norm.weight), fp32(mlp_norm.bias), mlp_norm.spec.eps, experts, up._impl if dense else None,
            down._impl if dense else None, _GATED.get(activation, 0), attn.num_heads, attn.num_kv_heads,
            attn.head_dim, rotary, bool(rotary) and attn.position.interleaved, attn.softmax_scale,
            attn.softcap or 0.0, self._isa)

    def attention(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor, length: int,
                  scale: float, softcap: float | None = None) -> torch.Tensor | None:
        """``softmax(cap(scale · q kᵀ) + bias) v`` of q [B, H, T, d] over the first `length` slots of the cache
        keys/values [B, KVH, cap, d] (grouped heads), bias [B, 1|H, T, length], where cap(s) = softcap·tanh(s /
        softcap) (the identity when `softcap` is None: `Attention.softcap`); [B, T, H·d] in fp32 math (for
        decode, where torch's SDPA costs ~300 µs a call)."""
        if q.shape[-1] > 256 or not self._applies(q, keys, values):
            return None
        return self._module.attention(q.contiguous(), keys, values, bias.contiguous(), length, scale, softcap or 0.0,
                                      self._isa)

    def rope_and_cache(self, qkv: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None,
                       keys: torch.Tensor, values: torch.Tensor, past: int, heads: int, kv_heads: int, head_dim: int,
                       rotary_dim: int, interleaved: bool) -> torch.Tensor | None:
        """``ReferenceOps.rope_and_cache`` in one compiled pass (same roundings): q [B, H, T, d], with k and v
        written into the caches at slots ``past..past+T``."""
        if not self._applies(qkv, keys, values):
            return None
        cos, sin = rotary if rotary is not None else (None, None)
        return self._module.rope_and_cache(qkv.contiguous(), cos, sin, keys, values, past, heads, kv_heads,
                                           head_dim, rotary_dim if rotary is not None else 0, interleaved)

    def add_rms_norm(self, x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                     bias: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(x + delta, RMSNorm(x + delta))`` (``x`` and its norm without a delta): fp32 math, ``weight`` (and
        ``bias``) fp32 multiplied in before the one rounding, like the torch ops they replace."""
        if not self._applies(x) or (delta is not None and (delta.dtype != x.dtype or delta.shape != x.shape)):
            return None
        return self._module.add_rms_norm(x.contiguous(), None if delta is None else delta.contiguous(),
                                         weight.float(), None if bias is None else bias.float(), eps, self._isa)


def _compiled(*layers: object) -> bool:
    """Whether every one of `layers` is a kernel layer with its compiled implementation."""
    return all(isinstance(layer, _KernelLinear) and layer._impl is not None for layer in layers)


def fused_kernels() -> FusedKernels:
    """The fused ops of the ISA ``POLYLM_GEMV_ISA`` picks now (built on first call); every op declines where the
    extension is unavailable or disabled (``POLYLM_GEMV_ISA=none``). Made once per runtime, so that a decode
    step does not ask again for each op."""
    module, isa, _ = _build.select_isa()
    return FusedKernels(module if isa is not None else None, isa)


def _warn_fallback(reason: str) -> None:
    """One warning per process when layers fall back to stock torch ops for a reason the user did not ask for."""
    global _warned
    if not _warned and not reason.startswith("disabled by"):
        _warned = True
        warnings.warn(f"polylm cpu_gemv kernels unavailable, using stock torch ops: {reason}", stacklevel=3)


def _nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _check_weight(weight: torch.Tensor, dtypes: tuple[torch.dtype, ...]) -> None:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D [out_features, in_features] tensor, got {type(weight).__name__} "
                         f"of shape {tuple(getattr(weight, 'shape', ()))}")
    if weight.dtype not in dtypes:
        raise TypeError(f"weight dtype must be one of {dtypes}, got {weight.dtype}")
    if weight.device.type != "cpu":
        raise ValueError(f"weight must be on the CPU, got {weight.device}")


def _check_bias(bias: torch.Tensor | None, out_features: int) -> torch.Tensor | None:
    if bias is None:
        return None
    if bias.shape != (out_features,):
        raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
    return bias.detach().float().contiguous()


class _KernelLinear:
    """Shared shell: the compiled implementation (``_impl``) or a stock-torch fallback."""

    in_features: int
    out_features: int
    isa: str  # "avx512", "avx2", or "torch" when falling back
    nbytes: int  # bytes of weight storage the layer holds
    _impl: object | None

    @property
    def shape(self) -> torch.Size:
        """The weight's shape, [out_features, in_features]."""
        return torch.Size((self.out_features, self.in_features))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T + b`` for x of shape [..., in_features] (fp32, bf16 or fp16); returns x's dtype."""
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        # Replaced per instance by the compiled layer (which checks x itself), keeping __call__ one frame deep.
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"{type(self).__name__}: input has last dimension "
                             f"{x.shape[-1] if x.dim() else None}, expected {self.in_features}")
        return self._fallback(x)

    def _fallback(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(in_features={self.in_features}, out_features={self.out_features}, "
                f"isa={self.isa!r})")


def _linear_fp32(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear with fp32 accumulation semantics, cast back to x's dtype."""
    with torch.no_grad():
        if x.dtype == weight.dtype:
            return F.linear(x, weight, None if bias is None else bias.to(x.dtype))
        y = F.linear(x.float(), weight.float(), bias)
        return y.to(x.dtype)


class PackedLinear(_KernelLinear):
    """A linear layer whose bf16/fp16/fp32 weight is repacked once for the small-M kernel.

    Args:
        weight: [out_features, in_features] bf16, fp16 or fp32 CPU tensor.
        bias: optional [out_features] tensor (kept in fp32).
        max_kernel_rows: inputs with at most this many rows use the kernel (passes of 16, 8 or 4 rows of x);
            larger ones use the tiled unpack + matmul path.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                 max_kernel_rows: int = MAX_KERNEL_ROWS) -> None:
        _check_weight(weight, (torch.bfloat16, torch.float16, torch.float32))
        self.out_features, self.in_features = weight.shape
        self.dtype = weight.dtype
        bias32 = _check_bias(bias, self.out_features)
        module, isa, reason = _build.select_isa()
        if module is None or isa is None:
            self.isa, self._impl = "torch", None
            self._weight, self._bias = weight.detach(), bias32
            self.nbytes = _nbytes(weight)
            _warn_fallback(reason)
            return
        self.isa = isa
        self._packed = _layout.pack_float(weight.detach())  # shared with the compiled layer, for `rows`
        self.nbytes = _nbytes(self._packed)
        self._impl = module.FloatGemv(self._packed, self.out_features, self.in_features, bias32,
                                      _build.ISA_CODES[isa], max_kernel_rows)
        self._forward = self._impl

    @property
    def weight(self) -> torch.Tensor:
        """The [out_features, in_features] weight in its original dtype (unpacked: a new tensor)."""
        if self._impl is None:
            return self._weight
        return self._impl.unpacked().to(self.dtype)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """``weight[ids]`` read from the layer's own copy, so that an embedding tied to this layer is stored once."""
        if self._impl is None:
            return self._weight[ids]
        return _layout.gather_rows(self._packed, self.in_features, ids)

    def _fallback(self, x: torch.Tensor) -> torch.Tensor:
        return _linear_fp32(x, self._weight, self._bias)


class _QuantLinear(_KernelLinear):
    """Shared construction of the weight-only quantized layers from signed integer codes and their scales."""

    bits: int
    _scale_dtype: torch.dtype

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                 group_size: int | None, max_kernel_rows: int, dtype: torch.dtype) -> None:
        _check_weight(qweight, (torch.int8,))
        self.out_features, self.in_features = qweight.shape
        self.dtype = dtype  # of the rows `rows` returns
        qmin, qmax = -2 ** (self.bits - 1), 2 ** (self.bits - 1) - 1
        if self.bits == 4 and qweight.numel() and not qmin <= int(qweight.min()) <= int(qweight.max()) <= qmax:
            raise ValueError(f"int4 qweight values must be in {qmin}..{qmax}, found "
                             f"{int(qweight.min())}..{int(qweight.max())}")
        self.group_size = _layout.int8_group_size(self.in_features, group_size)
        _layout.check_group(self.group_size)
        groups = -(-self.in_features // self.group_size)
        if scales.shape != (self.out_features, groups):
            raise ValueError(f"scales must have shape {(self.out_features, groups)}, got {tuple(scales.shape)}")
        q, scales = qweight.detach(), scales.detach().to(self._scale_dtype).contiguous()
        bias32 = _check_bias(bias, self.out_features)
        module, isa, reason = _build.select_isa()
        if module is None or isa is None:
            self.isa, self._impl = "torch", None
            self._plain, self._bias = (q, scales), bias32
            self.nbytes = _nbytes(q, scales)
            _warn_fallback(reason)
            return
        self.isa = isa
        pack = _layout.pack_int8 if self.bits == 8 else _layout.pack_int4
        self._packed = (pack(q, self.group_size), _layout.pack_group_params(scales))  # shared with the kernel
        self.nbytes = _nbytes(*self._packed)
        self._impl = module.QuantGemv(*self._packed, _QUANT_KIND[self.bits], self.group_size, self.out_features,
                                      self.in_features, bias32, _build.ISA_CODES[isa], max_kernel_rows)
        self._forward = self._impl

    @classmethod
    def _quantized(cls, weight: torch.Tensor, bias: torch.Tensor | None, group_size: int | None,
                   max_kernel_rows: int) -> _QuantLinear:
        """`weight` quantized by the core reference (`polylm.numerics.quantization`), then packed."""
        _check_weight(weight, (torch.bfloat16, torch.float16, torch.float32))
        _layout.check_group(_layout.int8_group_size(weight.shape[1], group_size))
        quantized = quantization.quantize(weight.detach().float().numpy(), Quantization(cls.bits, group_size))
        return cls(torch.from_numpy(quantized.codes), torch.from_numpy(quantized.scales), bias, group_size,
                   max_kernel_rows=max_kernel_rows, dtype=weight.dtype)

    def dequantize(self) -> torch.Tensor:
        """The dequantized [out_features, in_features] weight in fp32 (the exact values the layer computes with)."""
        if self._impl is not None:
            return self._impl.unpacked()
        q, scales = self._plain
        return torch.from_numpy(quantization.QuantizedArrays(q.numpy(), scales.float().numpy(),
                                                              self.group_size).dequantize())

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """``dequantize()[ids]`` in the layer's `dtype`, dequantizing only those rows of its own storage, so that
        an embedding tied to this layer is stored once (quantized)."""
        if self._impl is None:
            q, scales = self._plain
            flat = ids.reshape(-1)
            picked = quantization.QuantizedArrays(q[flat].numpy(), scales[flat].float().numpy(), self.group_size)
            return torch.from_numpy(picked.dequantize()).reshape(*ids.shape, self.in_features).to(self.dtype)
        return _layout.gather_quant_rows(*self._packed, self.bits, self.group_size, self.in_features,
                                         ids).to(self.dtype)

    def _fallback(self, x: torch.Tensor) -> torch.Tensor:
        return _linear_fp32(x, self.dequantize(), self._bias)


class Int8Linear(_QuantLinear):
    """Weight-only int8 linear layer: ``w = q * scale``, one fp32 scale per output row or per row and group.

    Args:
        qweight: [out_features, in_features] int8 in [-127, 127] (or -128).
        scales: [out_features, groups] (stored as fp32); groups = 1 for per-channel scales.
        bias: optional [out_features].
        group_size: inputs per group (a multiple of 16), or None for per-channel scales.
        max_kernel_rows: as for :class:`PackedLinear`.
        dtype: the dtype `rows` returns (the compute dtype; `from_float` keeps the weight's).
    """

    bits = 8
    _scale_dtype = torch.float32

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None,
                 group_size: int | None = None, *, max_kernel_rows: int = MAX_KERNEL_ROWS,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__(qweight, scales, bias, group_size, max_kernel_rows, dtype)

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, group_size: int | None = None,
                   *, max_kernel_rows: int = MAX_KERNEL_ROWS) -> Int8Linear:
        """Quantize a float [out_features, in_features] weight as the IR's int8 scheme says (absmax / 127)."""
        return cls._quantized(weight, bias, group_size, max_kernel_rows)


class Int4Linear(_QuantLinear):
    """Weight-only int4 linear layer with bf16 group scales: ``w = q * scale``, q in -8..7 (the IR's scheme
    uses -7..7).

    Args:
        qweight: [out_features, in_features] int8 holding values -8..7.
        scales: [out_features, groups] (stored as bf16).
        bias: optional [out_features].
        group_size: inputs per group, a multiple of 16 (32..128 usual).
        max_kernel_rows: as for :class:`PackedLinear`.
        dtype: the dtype `rows` returns (the compute dtype; `from_float` keeps the weight's).
    """

    bits = 4
    _scale_dtype = torch.bfloat16

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None,
                 group_size: int = 32, *, max_kernel_rows: int = MAX_KERNEL_ROWS,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__(qweight, scales, bias, group_size, max_kernel_rows, dtype)

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, group_size: int = 32,
                   *, max_kernel_rows: int = MAX_KERNEL_ROWS) -> Int4Linear:
        """Quantize a float [out_features, in_features] weight as the IR's int4 scheme says (absmax / 7 per
        group, bf16 scales)."""
        return cls._quantized(weight, bias, group_size, max_kernel_rows)
