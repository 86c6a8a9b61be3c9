"""Loading a checkpoint `polylm convert` wrote (MLX int4, groups of 64) against quantizing at load
(`quantize="int4"`), on gemma-bench, per backend: seconds from `polylm.load` to a loaded model (median of 3,
after one warm-up load), and the one-off conversion time.

    python benchmarks/bench_convert.py [--backends mlx torch]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import polylm  # noqa: E402
from models import build  # noqa: E402
from polylm.loading.convert import convert  # noqa: E402


def load_seconds(path: Path, backend: str, quantize: str | None) -> float:
    polylm.load(path, backend=backend, quantize=quantize)  # warm-up: imports, page cache, kernels
    times = []
    for _ in range(3):
        start = time.perf_counter()
        polylm.load(path, backend=backend, quantize=quantize)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backends", nargs="+", default=["mlx", "torch"])
    args = parser.parse_args()
    source = build("gemma-bench")
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        converted = convert(source, Path(tmp) / "int4", quantize="int4")
        print(f"convert: {time.perf_counter() - start:.2f} s (once)")
        for backend in args.backends:
            at_load = load_seconds(source, backend, "int4")
            stored = load_seconds(converted, backend, None)
            print(f"{backend}: quantize at load {at_load:.2f} s, converted {stored:.2f} s "
                  f"(×{at_load / stored:.1f})")


if __name__ == "__main__":
    main()
