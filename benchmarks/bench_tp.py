"""Tensor parallelism on one machine: prefill and decode tok/s and memory per rank, 1 rank against N ranks
(torch backend, gloo over loopback), same checkpoint, prompt and token counts, one run.

    python benchmarks/bench_tp.py [--model gemma-bench] [--ranks 1 2] [--threads 2] [--prompt-tokens 128]
                                  [--new-tokens 32] [--dtype bfloat16]

`--threads` is the machine's CPU budget: a job of N ranks gives each rank threads // N (at least 1), so every
configuration uses the same cores. Each rank reports the weight bytes it holds and its peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from models import build  # noqa: E402

RANK_RUN = """
import json, resource, sys, time
import numpy as np
path, dtype, prompt_tokens, new_tokens, world, out = sys.argv[1:7]
prompt_tokens, new_tokens, world = int(prompt_tokens), int(new_tokens), int(world)
import polylm
from polylm.backend import Step
from polylm.parallel import follow, release
if world > 1:
    import torch.distributed as dist
    dist.init_process_group("gloo")
rank = dist.get_rank() if world > 1 else 0
start = time.perf_counter()
model = polylm.load(path, backend="torch", dtype=dtype, tensor_parallel=world if world > 1 else None)
load_s = time.perf_counter() - start
runtime = model.runtime
if world > 1:
    held = runtime.local.held_bytes()
else:
    from polylm_torch_common.parallel import param_bytes
    held = param_bytes(runtime.params)
result = dict(rank=rank, load_s=load_s, held_mb=held / 2**20)
if rank == 0:
    ids = np.random.default_rng(0).integers(3, model.ir.embedding.vocab_size, prompt_tokens)[None]

    def run(prompt, new):
        total = prompt.shape[1] + new
        cache = runtime.new_cache(1, total)
        positions, mask = np.arange(total)[None], np.ones((1, total), dtype=bool)
        t0 = time.perf_counter()
        logits = runtime.forward(Step(prompt, positions[:, :prompt.shape[1]], mask[:, :prompt.shape[1]],
                                      gather=np.array([prompt.shape[1] - 1])), cache)
        t1 = time.perf_counter()
        for i in range(prompt.shape[1], total):
            token = logits.argmax(-1)[:, None]
            logits = runtime.forward(Step(token, positions[:, :i + 1], mask[:, :i + 1], gather=np.array([0])), cache)
        return t1 - t0, time.perf_counter() - t1

    run(ids[:, :8], 4)  # warm up
    prefill_s, decode_s = run(ids, new_tokens)
    result.update(prefill_tok_s=prompt_tokens / prefill_s, decode_tok_s=new_tokens / decode_s,
                  decode_ms_per_token=decode_s / new_tokens * 1000)
    if world > 1:
        release(model)
elif world > 1:
    follow(model)
result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
json.dump(result, open(f"{out}/rank{rank}.json", "w"))
"""


def bench(path: Path, world: int, threads: int, dtype: str, prompt_tokens: int, new_tokens: int) -> list[dict]:
    from polylm.parallel.ranks import free_port

    per_rank = max(1, threads // world)
    with tempfile.TemporaryDirectory() as out:
        port = str(free_port())
        ranks = []
        for rank in range(world):
            env = {**os.environ, "OMP_NUM_THREADS": str(per_rank), "POLYLM_QUIET": "1", "RANK": str(rank),
                   "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
            ranks.append(subprocess.Popen([sys.executable, "-c", RANK_RUN, str(path), dtype, str(prompt_tokens),
                                           str(new_tokens), str(world), out], env=env))
        for process in ranks:
            if process.wait(timeout=900):
                raise SystemExit(f"a rank of the {world}-rank run exited with {process.returncode}")
        return [json.loads((Path(out) / f"rank{r}.json").read_text()) | {"threads": per_rank} for r in range(world)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma-bench")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    path = build(args.model)
    print(f"{args.model} ({args.dtype}), prompt {args.prompt_tokens} tokens, {args.new_tokens} new, "
          f"{args.threads} threads in all")
    print(f"{'ranks':>5} {'thr/rank':>8} {'prefill tok/s':>14} {'decode tok/s':>13} {'ms/token':>9} "
          f"{'weights MB/rank':>16} {'peak RSS MB/rank':>17}")
    for world in args.ranks:
        results = bench(path, world, args.threads, args.dtype, args.prompt_tokens, args.new_tokens)
        first = results[0]
        held = "/".join(f"{r['held_mb']:.0f}" for r in results)
        rss = "/".join(f"{r['peak_rss_mb']:.0f}" for r in results)
        print(f"{world:>5} {first['threads']:>8} {first['prefill_tok_s']:>14.1f} {first['decode_tok_s']:>13.1f} "
              f"{first['decode_ms_per_token']:>9.1f} {held:>16} {rss:>17}", flush=True)


if __name__ == "__main__":
    main()
