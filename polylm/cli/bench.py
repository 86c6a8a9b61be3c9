"""`polylm bench`: load time, time to first token, prefill and decode speed, peak memory — on any backend."""

from __future__ import annotations

import os
import resource
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np

from ..errors import InputError
from ..generate.sampling import Sampling
from ..generate.scheduler import decode_batch
from ..loading import load
from ..loading.registry import registry


@dataclass(frozen=True)
class BenchResult:
    """`import_s`: importing the backend's framework (torch, MLX…), which any runtime on it pays; `load_s`:
    `polylm.load` after it; `model_rss_mb`: the peak resident memory above what it was right before the load
    (None where the current resident memory cannot be read). A task head (classification, QA) makes no tokens:
    its "first token" is one forward pass over the prompt, and `decode_tok_s` is None."""

    import_s: float
    load_s: float
    ttft_s: float
    prefill_tok_s: float
    decode_tok_s: float | None
    peak_rss_mb: float
    model_rss_mb: float | None
    prompt_tokens: int
    new_tokens: int
    backend: str
    dtype: str

    def as_dict(self) -> dict:
        return asdict(self)


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def current_rss_mb() -> float | None:
    """This process's resident memory now in MB, from /proc (None where there is no /proc, e.g. macOS)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / (1024 * 1024)
    except (OSError, ValueError, IndexError):
        return None


def bench(path: str, *, backend: str = "auto", dtype: str | None = None, quantize: str | None = None,
          prompt_tokens: int = 128, new_tokens: int = 64, warmup: bool = True) -> BenchResult:
    """Measure one greedy generation of `new_tokens` after a random `prompt_tokens`-token prompt (batch 1).

    eos is ignored so every run decodes the same number of tokens. Prefill speed is prompt tokens over the
    time to the first token; decode speed is the remaining tokens over their time.
    """
    start = time.perf_counter()
    backend = registry().backend(backend).name  # its availability check imports the framework
    import_s = time.perf_counter() - start
    before = current_rss_mb()
    start = time.perf_counter()
    model = load(path, backend=backend, dtype=dtype, quantize=quantize)
    load_s = time.perf_counter() - start
    generates = model.task == "causal-lm"
    wanted = prompt_tokens + (new_tokens if generates else 0)
    if wanted > model.ir.context_length:
        raise InputError(f"{prompt_tokens} prompt tokens{f' + {new_tokens} new' if generates else ''} exceed the "
                         f"model's context of {model.ir.context_length} tokens; lower --prompt-tokens"
                         f"{' / --new-tokens' if generates else ''}")
    prompt = np.random.default_rng(0).integers(3, model.ir.embedding.vocab_size, prompt_tokens).tolist()
    if not generates:
        model.forward([prompt[:8]])  # warm-up
        start = time.perf_counter()
        model.forward([prompt])
        ttft = time.perf_counter() - start
        peak = peak_rss_mb()
        return BenchResult(import_s, load_s, ttft, prompt_tokens / ttft, None, peak,
                           None if before is None else max(0.0, peak - before), prompt_tokens, 0, model.backend,
                           model.dtype)
    sampling = Sampling(max_new_tokens=new_tokens)
    if warmup:
        for _ in decode_batch(model.runtime, [prompt[:8]], Sampling(max_new_tokens=4), (), 16):
            pass
    start = time.perf_counter()
    steps = decode_batch(model.runtime, [prompt], sampling, (), prompt_tokens + new_tokens)
    next(steps)
    ttft = time.perf_counter() - start
    count = sum(1 for _ in steps)
    decode_s = time.perf_counter() - start - ttft
    peak = peak_rss_mb()  # may read a little below `before` when the load added nothing: the counters lag
    return BenchResult(import_s, load_s, ttft, prompt_tokens / ttft, count / decode_s if count else 0.0, peak,
                       None if before is None else max(0.0, peak - before), prompt_tokens, count + 1, model.backend,
                       model.dtype)
