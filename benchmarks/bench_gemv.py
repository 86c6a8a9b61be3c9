"""Decode-shaped matrix-vector throughput of polylm's CPU kernels against F.linear and a memory-read ceiling.

Streams weights much larger than L3 (default: 48 distinct 4096 x 1024 bf16 matrices, 403 MB, used round-robin in
windows of 8 matrices = 64 MB, methods interleaved), with x of one row, and reports GB/s of weight bytes read:

- ``read``: every byte of each bf16 matrix read by torch's threads as 4 sequential streams each (the same-run
  ceiling; the machines are shared, so only ratios within one run mean much: short windows are timed many
  times, and the best ones are those that ran undisturbed);
- ``F.linear bf16``: stock torch (oneDNN) with a bf16 weight and bf16 x;
- ``packed bf16``: :class:`PackedLinear` with fp32 x and with bf16 x;
- ``int8`` / ``int4``: :class:`Int8Linear` (per-channel) and :class:`Int4Linear` (group 32, symmetric), fp32 x,
  counted in their own (smaller) bytes; the "speedup vs F.linear" column is the ratio of times per call, i.e.
  the decode speedup per layer;
- optionally torch's own ``_weight_int8pack_mm`` / ``_weight_int4pack_mm_for_cpu`` as peers (``--peers``).

Run: ``python benchmarks/bench_gemv.py`` (options: --help). Set POLYLM_GEMV_ISA=avx2 to time the AVX2 path.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

try:
    from polylm_torch import cpu_gemv
except ImportError:  # not installed: run from the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "backends"))
    from polylm_torch import cpu_gemv

from polylm_torch.cpu_gemv import Int4Linear, Int8Linear, PackedLinear, _build


def _time_pass(calls: list[Callable[[], object]]) -> float:
    start = time.perf_counter()
    for call in calls:
        call()
    return time.perf_counter() - start


def _cpu_summary() -> str:
    name = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = sorted(f for f in _build.cpu_flags() if f.startswith("avx512") or f == "avx2")
    return f"{name} [{' '.join(flags)}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--matrices", type=int, default=48, help="distinct weight matrices, used round-robin")
    parser.add_argument("--out-features", type=int, default=4096)
    parser.add_argument("--in-features", type=int, default=1024)
    parser.add_argument("--window", type=int, default=8,
                        help="matrices per timed window (8 x 8 MB = 2x L3); windows continue round-robin")
    parser.add_argument("--rounds", type=int, default=60, help="timed windows per method")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, default=1, help="rows of x (M)")
    parser.add_argument("--peers", action="store_true", help="also time torch's int8/int4 packed matmuls")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    ok, reason = cpu_gemv.available()
    if not ok:
        sys.exit(f"cpu_gemv kernels unavailable: {reason}")
    module, _ = _build.load()
    n, k, count = args.out_features, args.in_features, args.matrices
    gen = torch.Generator().manual_seed(0)
    weights = [(torch.randn(n, k, generator=gen) * 0.02).to(torch.bfloat16) for _ in range(count)]
    x32 = torch.randn(args.rows, k, generator=gen)
    x16 = x32.to(torch.bfloat16)
    bf16_bytes = n * k * 2

    # name -> (calls of one pass, bytes read per pass)
    methods: dict[str, tuple[list[Callable[[], object]], int]] = {}
    methods["read (4 streams/thread)"] = ([lambda w=w: module.stream_read(w, 4) for w in weights], count * bf16_bytes)
    methods["F.linear bf16 (x bf16)"] = ([lambda w=w: F.linear(x16, w) for w in weights], count * bf16_bytes)
    packed = [PackedLinear(w) for w in weights]
    isa = packed[0].isa
    methods["packed bf16 (x fp32)"] = ([lambda p=p: p(x32) for p in packed], count * bf16_bytes)
    methods["packed bf16 (x bf16)"] = ([lambda p=p: p(x16) for p in packed], count * bf16_bytes)
    int8 = [Int8Linear.from_float(w) for w in weights]
    int8_bytes = n * k + n * 4
    methods["int8 per-channel (x fp32)"] = ([lambda q=q: q(x32) for q in int8], count * int8_bytes)
    int4 = [Int4Linear.from_float(w, group_size=32) for w in weights]
    int4_bytes = n * k // 2 + n * (k // 32) * 2
    methods["int4 g32 sym (x fp32)"] = ([lambda q=q: q(x32) for q in int4], count * int4_bytes)
    if args.peers:
        int8_plain, int4_plain = [], []
        for w in weights:
            w32 = w.float()
            s = w32.abs().amax(dim=1) / 127.0
            int8_plain.append((torch.round(w32 / s[:, None]).to(torch.int8), s.to(torch.bfloat16)))
            g = w32.reshape(n, k // 32, 32)
            lo, hi = g.amin(-1), g.amax(-1)
            scale = ((hi - lo) / 15).clamp_min(1e-8)
            q = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32).reshape(n, k)
            # torch's convention: w = (q - 8) * scale + zero
            zeros = lo + 8 * scale
            sz = torch.stack([scale.t(), zeros.t()], dim=-1).to(torch.bfloat16).contiguous()
            int4_plain.append((torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1), sz))
        methods["torch _weight_int8pack_mm (x bf16)"] = (
            [lambda q=q, s=s: torch.ops.aten._weight_int8pack_mm(x16, q, s) for q, s in int8_plain],
            count * int8_bytes,
        )
        methods["torch _weight_int4pack_mm g32 (x bf16)"] = (
            [lambda q=q, s=s: torch.ops.aten._weight_int4pack_mm_for_cpu(x16, q, 32, s) for q, s in int4_plain],
            count * int4_bytes,
        )

    print(f"{_cpu_summary()}, {args.threads} threads, kernel ISA {isa}")
    print(f"{count} x [{n} x {k}] weights ({count * bf16_bytes / 1e6:.0f} MB as bf16), x: {args.rows} row(s); "
          f"{args.rounds} timed windows of {args.window} matrices each, methods interleaved, round-robin")
    for calls, _ in methods.values():  # warm-up: first touches, thread pool start
        _time_pass(calls)
    # Short windows: on a shared machine the best windows are the ones that ran undisturbed.
    times: dict[str, list[float]] = {name: [] for name in methods}
    window = 0  # one round-robin over all windows of all methods: no window follows one on the same matrices
    for _ in range(args.rounds):
        for name, (calls, _) in methods.items():
            picks = [(window * args.window + i) % count for i in range(args.window)]
            times[name].append(_time_pass([calls[i] for i in picks]))
            window += 1

    def gbs(name: str, seconds: float) -> float:
        return methods[name][1] / count * args.window / seconds / 1e9

    read_name, linear_name = "read (4 streams/thread)", "F.linear bf16 (x bf16)"
    read_best = gbs(read_name, min(times[read_name]))
    linear_best = min(times[linear_name])
    print(f"{'method':38s} {'GB/s best':>9s} {'median':>7s} {'vs read':>8s} {'speedup vs F.linear':>20s}")
    for name in methods:
        best, median = min(times[name]), statistics.median(times[name])
        print(f"{name:38s} {gbs(name, best):9.1f} {gbs(name, median):7.1f} {gbs(name, best) / read_best:8.0%} "
              f"{linear_best / best:19.2f}x")
    print("vs read: best GB/s over the best read GB/s; speedup: time per call of F.linear bf16 over the method's.")


if __name__ == "__main__":
    main()
