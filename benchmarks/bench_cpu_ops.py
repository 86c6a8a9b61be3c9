"""polylm's compiled CPU ops against the stock torch ops they replace, on gemma-bench's shapes, in one run.

- the prefill GEMM: :class:`PackedLinear` with bf16 x of `--rows` rows against ``F.linear`` (oneDNN) with the
  bf16 weight, in GFLOP/s, for the four matrices of a gemma-bench layer;
- the fused decode ops, in µs a call: attention of one query over a 192-slot cache (16 heads, 1 KV head)
  against ``F.scaled_dot_product_attention``; tanh-GELU(gate) × up and residual add + RMSNorm of ``CpuOps``
  against the plain-torch ``ReferenceOps``, at prefill and decode sizes.

Methods alternate and each figure is the median of `--repeat` timed batches (the machines are shared).

    python benchmarks/bench_cpu_ops.py [--threads 2] [--rows 128] [--repeat 15]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from polylm.ir import MLP, Norm
from polylm_torch import cpu_gemv
from polylm_torch.cpu_gemv import PackedLinear
from polylm_torch.cpu_ops import CpuOps
from polylm_torch_common.ops import ReferenceOps
from polylm_torch_common.params import NormParams

SHAPES = {"q/k/v": (1152, 1024), "o": (1024, 1024), "gate/up": (8192, 1024), "down": (1024, 4096)}


def timed(pair: dict[str, Callable[[], object]], repeat: int, calls: int) -> dict[str, float]:
    """Median seconds a call of each function, timing them in alternation."""
    samples: dict[str, list[float]] = {name: [] for name in pair}
    for fn in pair.values():
        fn()
    for _ in range(repeat):
        for name, fn in pair.items():
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            samples[name].append((time.perf_counter() - start) / calls)
    return {name: statistics.median(s) for name, s in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, default=128, help="prompt tokens (rows of x) for the GEMM")
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.pop("POLYLM_GEMV_ISA", None)
    print(f"{args.threads} threads; isa {cpu_gemv._build.select_isa()[1]}; medians of {args.repeat}")
    print(f"\nprefill GEMM, {args.rows} rows, bf16 (GFLOP/s)")
    for name, (n, k) in SHAPES.items():
        weight, x = torch.randn(n, k).bfloat16(), torch.randn(args.rows, k).bfloat16()
        layer = PackedLinear(weight)
        t = timed({"packed": lambda: layer(x), "F.linear": lambda: F.linear(x, weight)}, args.repeat, 3)
        flop = 2 * args.rows * n * k
        print(f"  {name:8s} {n}x{k}: polylm {flop / t['packed'] / 1e9:6.0f}   "
              f"F.linear {flop / t['F.linear'] / 1e9:6.0f}   ×{t['F.linear'] / t['packed']:.2f}")
    ops, reference = CpuOps(), ReferenceOps()
    q, cache = torch.randn(1, 16, 1, 64).bfloat16(), torch.randn(1, 1, 256, 64).bfloat16()
    bias = torch.zeros(1, 1, 1, 192).bfloat16()
    fused = {"decode attention, 192 slots": (
        lambda: cpu_gemv.fused_kernels().attention(q, cache, cache, bias, 192, 0.125),
        lambda: F.scaled_dot_product_attention(q, cache[:, :, :192], cache[:, :, :192], attn_mask=bias,
                                               scale=0.125, enable_gqa=True))}
    norm = NormParams(Norm("rms", 1e-6), torch.randn(1024), None)
    for rows in (args.rows, 1):
        h = torch.randn(rows, 8192).bfloat16()
        x, delta = torch.randn(rows, 1024).bfloat16(), torch.randn(rows, 1024).bfloat16()
        mlp = MLP(4096, "gelu_tanh", True)
        fused[f"tanh-GELU(gate) × up, {rows} rows"] = (lambda h=h, mlp=mlp: ops.activation(h, mlp),
                                                      lambda h=h, mlp=mlp: reference.activation(h, mlp))
        fused[f"add + RMSNorm, {rows} rows"] = (lambda x=x, d=delta: ops.add_norm(x, d, norm),
                                               lambda x=x, d=delta: reference.add_norm(x, d, norm))
    print("\nfused ops (µs a call)")
    for name, (ours, theirs) in fused.items():
        t = timed({"polylm": ours, "torch": theirs}, args.repeat, 20)
        print(f"  {name:32s} polylm {t['polylm'] * 1e6:8.1f}   torch {t['torch'] * 1e6:8.1f}   "
              f"×{t['torch'] / t['polylm']:.2f}")


if __name__ == "__main__":
    main()
