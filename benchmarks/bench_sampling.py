"""Host time a sequence's sampler spends per token, by setting and vocabulary size (not a test).

A greedy row or a top-k row (k ≤ `MAX_TOP_K_FROM_TOP`, no repetition penalty) reads only the runtime's top logits
(`Sampler.pick_top`); the others read the whole row (`Sampler.pick`). Logits are random normal × 3 in float32,
the same for every setting; each figure is the median of `--repeats` picks.

    python benchmarks/bench_sampling.py [--vocab 32000,128256,262144] [--repeats 50]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from polylm.generate.sampling import Sampler, Sampling
from polylm.numerics.logits import top_rows

SETTINGS = {
    "greedy": Sampling(),
    "temperature 0.8, top-k 40": Sampling(temperature=0.8, top_k=40, seed=0),
    "temperature 1.0": Sampling(temperature=1.0, seed=0),
    "temperature 0.7, top-p 0.9": Sampling(temperature=0.7, top_p=0.9, seed=0),
    "temperature 0.7, top-p 0.9, min-p 0.05": Sampling(temperature=0.7, top_p=0.9, min_p=0.05, seed=0),
    "temperature 1.0, repetition penalty 1.1": Sampling(temperature=1.0, repetition_penalty=1.1, seed=0),
    "temperature 1.0, logprobs 5": Sampling(temperature=1.0, logprobs=5, seed=0),
}


def per_pick_ms(sampling: Sampling, logits: np.ndarray, repeats: int) -> tuple[str, float]:
    sampler = Sampler(sampling, range(200))
    if sampler.needs_full:
        path, pick = "whole row", lambda: sampler.pick(logits)
    else:
        ids, values, norm, nan = (a[0] for a in top_rows(logits[None], sampler.top, sampling.logprobs is not None))
        path, pick = "top logits", lambda: sampler.pick_top(ids, values, norm, nan)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        pick()
        times.append(time.perf_counter() - start)
    return path, 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", default="32000,128256,262144", help="vocabulary sizes, comma-separated")
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    sizes = [int(v) for v in args.vocab.split(",")]
    rows = {size: (np.random.default_rng(size).standard_normal(size) * 3).astype(np.float32) for size in sizes}
    print(f"| setting | reads | {' | '.join(f'ms a token, vocab {size}' for size in sizes)} |")
    print(f"|---|---|{'---|' * len(sizes)}")
    for name, sampling in SETTINGS.items():
        figures = [per_pick_ms(sampling, rows[size], args.repeats) for size in sizes]
        print(f"| {name} | {figures[0][0]} | {' | '.join(f'{ms:.2f}' for _, ms in figures)} |")


if __name__ == "__main__":
    main()
