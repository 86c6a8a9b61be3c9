"""Serving benchmark: `polylm serve` on gemma-bench under 1, 4, 16 and 32 concurrent streaming clients — total
throughput (completion tok/s) and time to first token (p50/p95) — and what prompt-prefix reuse saves.

    python benchmarks/bench_server.py [--backend torch] [--dtype float32] [--levels 1,4,16,32] [--json]

The server is a real `polylm serve` subprocess on 127.0.0.1 (batch 16); each client is a thread streaming
/v1/completions with httpx, `--rounds` requests one after another, greedy (or as `--sampling` says, e.g.
`--sampling '{"temperature": 0.8, "top_k": 40, "seed": 1}'`), with its own random token-id prompt.
gemma-bench's tokenizer knows only the byte alphabet, so most of its random tokens have no text: the requests ask
for `logprobs: 0`, which gives every token its own chunk, and time to first token is the first chunk's arrival.

Prefix reuse is measured on two workloads, served once with reuse (`--min-prefix 16`) and once without
(`--min-prefix 0`), one client: requests sharing a long system prompt, and a conversation whose prompt grows by
a turn each time. The saving is in prompt tokens computed (from /health) and in time to first token.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import build  # noqa: E402

NAME = "gemma-bench"


class Server:
    """`polylm serve` in a subprocess on a free port; its log is drained in a thread so it never blocks."""

    def __init__(self, directory: Path, backend: str, dtype: str, *extra: str) -> None:
        command = [sys.executable, "-m", "polylm", "serve", "--model", str(directory), "--backend", backend,
                   "--dtype", dtype, "--port", "0", "--max-batch", "16", "--max-queue", "256", *extra]
        self.process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True,
                                        env={**os.environ, "PYTHONWARNINGS": "ignore"})
        line = self.process.stderr.readline()
        found = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
        if not found:
            self.process.kill()
            raise RuntimeError(f"polylm serve did not start: {line}{self.process.stderr.read()}")
        self.url = f"http://127.0.0.1:{found.group(1)}"
        threading.Thread(target=self.process.stderr.read, daemon=True).start()
        self.model = str(directory)

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=30).json()

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)

    def stream(self, prompt: list[int], max_tokens: int, sampling: dict | None = None) -> tuple[float, float, int]:
        """One streamed completion (greedy unless `sampling` gives other body fields): (time to first token, total
        time, completion tokens)."""
        body = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                "logprobs": 0, "stream_options": {"include_usage": True}, **(sampling or {})}
        start, first, tokens = time.perf_counter(), None, 0
        with httpx.stream("POST", self.url + "/v1/completions", json=body, timeout=600) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if chunk["choices"] and first is None:
                    first = time.perf_counter() - start
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
        return first or 0.0, time.perf_counter() - start, tokens


def load_level(server: Server, clients: int, rounds: int, prompt_tokens: int, max_tokens: int, seed: int,
               sampling: dict | None = None) -> dict:
    rng = np.random.default_rng(seed)
    prompts = [[rng.integers(3, 32000, prompt_tokens).tolist() for _ in range(rounds)] for _ in range(clients)]

    def client(index: int) -> list[tuple[float, float, int]]:
        return [server.stream(prompt, max_tokens, sampling) for prompt in prompts[index]]

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(client, range(clients)) for r in rs]
    wall = time.perf_counter() - start
    ttft = np.array([r[0] for r in results])
    tokens = sum(r[2] for r in results)
    return {"clients": clients, "requests": len(results), "tokens": tokens, "wall_s": wall,
            "throughput_tok_s": tokens / wall, "ttft_p50_ms": 1000 * float(np.percentile(ttft, 50)),
            "ttft_p95_ms": 1000 * float(np.percentile(ttft, 95))}


def reuse_workloads(server: Server, max_tokens: int, seed: int) -> dict:
    """Shared system prompt (8 requests) and a growing 6-turn conversation, one client."""
    rng = np.random.default_rng(seed)
    system = rng.integers(3, 32000, 256).tolist()
    shared = [system + rng.integers(3, 32000, 16).tolist() for _ in range(8)]
    conversation, prompt = [], rng.integers(3, 32000, 64).tolist()
    for _ in range(6):
        conversation.append(prompt)
        prompt = prompt + rng.integers(3, 32000, 32).tolist()
    out = {}
    for name, prompts in (("shared_system_prompt", shared), ("conversation", conversation)):
        before = server.health()
        start = time.perf_counter()
        ttft = [server.stream(p, max_tokens)[0] for p in prompts]
        wall = time.perf_counter() - start
        after = server.health()
        out[name] = {"requests": len(prompts), "prompt_tokens": sum(map(len, prompts)),
                     "computed": after["prompt_tokens"] - before["prompt_tokens"],
                     "reused": after["reused_tokens"] - before["reused_tokens"],
                     "ttft_mean_ms": 1000 * float(np.mean(ttft)), "wall_s": wall}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--levels", default="1,4,16,32", help="concurrent clients, comma-separated")
    parser.add_argument("--rounds", type=int, default=2, help="requests per client, one after another")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--sampling", type=json.loads, default=None,
                        help='request fields for the load levels instead of greedy, e.g. \'{"temperature": 0.8, '
                             '"top_k": 40, "seed": 1}\'')
    parser.add_argument("--skip-reuse", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    directory = build(NAME)
    report: dict = {"model": NAME, "backend": args.backend, "dtype": args.dtype, "cpus": os.cpu_count(),
                    "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens,
                    "sampling": args.sampling or "greedy", "levels": []}
    server = Server(directory, args.backend, args.dtype)
    try:
        server.stream([5] * 8, 2)  # warm up
        for level, clients in enumerate(int(c) for c in args.levels.split(",")):
            report["levels"].append(load_level(server, clients, args.rounds, args.prompt_tokens, args.max_tokens,
                                               seed=level, sampling=args.sampling))
            if not args.json:
                row = report["levels"][-1]
                print(f"{clients:3d} clients: {row['requests']:3d} requests, {row['tokens']:4d} tokens in "
                      f"{row['wall_s']:6.2f} s = {row['throughput_tok_s']:7.1f} tok/s; TTFT p50 "
                      f"{row['ttft_p50_ms']:7.0f} ms, p95 {row['ttft_p95_ms']:7.0f} ms", flush=True)
    finally:
        server.close()
    if not args.skip_reuse:  # each on a fresh server, so both start from the same state
        report["reuse"] = {}
        for setting, extra in (("on", ()), ("off", ("--min-prefix", "0"))):
            server = Server(directory, args.backend, args.dtype, *extra)
            try:
                server.stream([5] * 8, 2)
                report["reuse"][setting] = reuse_workloads(server, 4, seed=100)
            finally:
                server.close()
        if not args.json:
            for name in ("shared_system_prompt", "conversation"):
                on, off = report["reuse"]["on"][name], report["reuse"]["off"][name]
                print(f"prefix reuse, {name}: {on['requests']} requests, {on['prompt_tokens']} prompt tokens; "
                      f"computed {on['computed']} with reuse vs {off['computed']} without "
                      f"({on['reused']} reused); mean TTFT {on['ttft_mean_ms']:.0f} ms vs {off['ttft_mean_ms']:.0f} ms; "
                      f"wall {on['wall_s']:.2f} s vs {off['wall_s']:.2f} s")
    if args.json:
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
