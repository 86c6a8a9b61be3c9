"""Side-by-side CPU benchmark: polylm (torch backend; bf16, fp32 compute, int8, int4) against transformers bf16,
plus mlx-lm (bf16, when it imports) and llama.cpp through llama-cpp-python (when it imports and `--gguf` names
a GGUF conversion of the same checkpoint) — same checkpoint, prompt, token counts and threads, one run.

    python benchmarks/bench_cpu.py [--model gemma-bench|bloom-bench] [--threads 2] [--prompt-tokens 128]
                                   [--new-tokens 64] [--repeat 3] [--gguf FILE] [--write RESULTS.md]

Each engine runs in its own process (so peak RSS and thread pools don't mix); ratios are against
transformers bf16 in the same run. A GGUF is made with llama.cpp's `convert_hf_to_gguf.py DIR --outtype bf16`
(no converter ships with polylm).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from models import CONFIGS, build  # noqa: E402

from polylm.progress import progress  # noqa: E402

TRANSFORMERS_RUN = """
import json, sys, time
start = time.perf_counter()
import numpy as np, torch, transformers
from polylm.cli.bench import current_rss_mb, peak_rss_mb
import_s = time.perf_counter() - start
path, prompt_tokens, new_tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
before = current_rss_mb()
start = time.perf_counter()
model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
load_s = time.perf_counter() - start
vocab = model.config.vocab_size
ids = torch.tensor([np.random.default_rng(0).integers(3, vocab, prompt_tokens).tolist()])
kwargs = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
with torch.inference_mode():
    model.generate(ids[:, :8], max_new_tokens=4, min_new_tokens=4, **kwargs)
    start = time.perf_counter()
    model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kwargs)
    ttft = time.perf_counter() - start
    start = time.perf_counter()
    model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
    total = time.perf_counter() - start
peak = peak_rss_mb()
print(json.dumps(dict(import_s=import_s, load_s=load_s, ttft_s=ttft, prefill_tok_s=prompt_tokens / ttft,
                      decode_tok_s=(new_tokens - 1) / (total - ttft), peak_rss_mb=peak,
                      model_rss_mb=None if before is None else peak - before)))
"""

# A peer engine's script: argv = path, prompt tokens, new tokens, threads; prints the same JSON as the others.
# Both time a greedy generation with their own loop: the first token is the prefill, the rest the decode.
PEER_PRELUDE = """
import json, sys, time
start = time.perf_counter()
import numpy as np
from polylm.cli.bench import current_rss_mb, peak_rss_mb
{imports}
import_s = time.perf_counter() - start
path, prompt_tokens, new_tokens, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
before = current_rss_mb()
start = time.perf_counter()
{load}
load_s = time.perf_counter() - start
prompt = np.random.default_rng(0).integers(3, vocab, prompt_tokens).tolist()
def timed(count):
    start = time.perf_counter()
    tokens = generate(prompt, count)
    next(tokens)
    first = time.perf_counter()
    for _ in range(count - 1):
        next(tokens)
    return first - start, time.perf_counter() - first
timed(4)
ttft, decode = timed(new_tokens)
peak = peak_rss_mb()
print(json.dumps(dict(import_s=import_s, load_s=load_s, ttft_s=ttft, prefill_tok_s=prompt_tokens / ttft,
                      decode_tok_s=(new_tokens - 1) / decode, peak_rss_mb=peak,
                      model_rss_mb=None if before is None else peak - before)))
"""
MLX_LM_RUN = PEER_PRELUDE.format(imports="""
import mlx.core as mx
from pathlib import Path
from bench_mlx import mlx_lm_engine""", load="""
mx.set_default_device(mx.cpu)
engine = mlx_lm_engine(Path(path), "bfloat16")
vocab = json.loads((Path(path) / "config.json").read_text())["vocab_size"]
def generate(ids, count):
    return engine(ids, count)""")
LLAMA_CPP_RUN = PEER_PRELUDE.format(imports="from llama_cpp import Llama", load="""
llm = Llama(model_path=path, n_threads=threads, n_ctx=prompt_tokens + new_tokens + 16, verbose=False)
vocab = llm.n_vocab()
def generate(ids, count):
    llm.reset()  # no reuse of the previous run's cache
    return llm.generate(ids, temp=0.0, reset=True)""")


def importable(module: str) -> bool:
    """Whether `module` imports in a fresh interpreter (peers are optional and run in their own process)."""
    return subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True).returncode == 0


def run(command: list[str], threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "POLYLM_QUIET": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=3600)
    if result.returncode != 0:
        return {"error": (result.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def polylm_run(path: Path, args, quantize: str | None = None, dtype: str = "bfloat16") -> dict:
    command = [sys.executable, "-m", "polylm", "bench", "--model", str(path), "--backend", "torch", "--dtype", dtype,
               "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens), "--json"]
    return run(command + (["--quantize", quantize] if quantize else []), args.threads)


def median_row(results: list[dict]) -> dict:
    """Each figure's median over an engine's runs (labels, and figures a run could not measure — None — as the
    first run gives them); the first error if any run failed."""
    failed = next((r for r in results if "error" in r), None)
    if failed is not None:
        return failed
    return {key: statistics.median(r[key] for r in results) if isinstance(value, (int, float)) else value
            for key, value in results[0].items()}


#: Bytes a weight takes per precision: bf16; int8 codes (+ a float32 scale per row, negligible); int4 codes and a
#: bfloat16 scale per 32.
BYTES_PER_WEIGHT = {"polylm bf16": 2.0, "polylm int8": 1.0, "polylm int4": 0.5 + 2 / 32}


def active_weights(path: Path) -> int:
    """Weights a decoded token reads: every block matrix but the experts a token does not choose (top-k of each
    mixture-of-experts layer), and the head (one embedding row is negligible)."""
    from polylm.ir import MoE
    from polylm.loading import model_ir

    ir = model_ir(path)
    total = 0
    for i, block in enumerate(ir.layers):
        shapes = {n: s for n, s in ir.tensor_shapes().items() if n.startswith(f"layers.{i}.") and n.endswith("weight")}
        for name, shape in shapes.items():
            size = math.prod(shape)
            if isinstance(block.mlp, MoE) and ".mlp.experts." in name:
                size = size * block.mlp.top_k // block.mlp.num_experts
            total += size if len(shape) > 1 else 0
    return total + ir.head.out_features * ir.hidden_size


def read_bandwidth(threads: int) -> float:
    """Bytes per second this machine reads a 1 GiB array at (the median of 5 sums), with `threads` threads."""
    import torch

    torch.set_num_threads(threads)
    data = torch.ones(1 << 28, dtype=torch.float32)  # float32: the sum keeps up with memory (bf16's converts)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        data.sum()
        times.append(time.perf_counter() - start)
    return data.numel() * data.element_size() / statistics.median(times)


def cpu_description() -> str:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in flags.splitlines() if line.startswith("model name")), "?")
    isa = "AVX-512 BF16" if "avx512_bf16" in flags else "AVX-512" if "avx512f" in flags else "AVX2"
    forced = os.environ.get("POLYLM_GEMV_ISA", "auto")
    return f"{model} ({isa}), {os.cpu_count()} cores" + ("" if forced == "auto" else f", POLYLM_GEMV_ISA={forced}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma-bench", choices=sorted(CONFIGS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3,
                        help="rounds over all engines (interleaved, so that a shared machine's slow spells hit "
                             "every engine alike); the table shows each figure's median")
    parser.add_argument("--gguf", default=None, metavar="FILE",
                        help="a GGUF of the same checkpoint, for the llama.cpp row (needs llama-cpp-python)")
    parser.add_argument("--write", default=None, metavar="FILE", help="append the table to this Markdown file")
    args = parser.parse_args()
    path = build(args.model)
    engines = {
        "transformers bf16": lambda: run([sys.executable, "-c", TRANSFORMERS_RUN, str(path), str(args.prompt_tokens),
                                          str(args.new_tokens)], args.threads),
        "polylm bf16": lambda: polylm_run(path, args),
        "polylm fp32 compute": lambda: polylm_run(path, args, dtype="float32"),
        "polylm int8": lambda: polylm_run(path, args, "int8"),
        "polylm int4": lambda: polylm_run(path, args, "int4"),
    }
    peer_args = [str(args.prompt_tokens), str(args.new_tokens), str(args.threads)]
    if importable("mlx_lm"):
        engines["mlx-lm bf16 (CPU)"] = lambda: run([sys.executable, "-c", MLX_LM_RUN, str(path), *peer_args],
                                                   args.threads)
    if args.gguf and importable("llama_cpp"):
        engines["llama.cpp (GGUF)"] = lambda: run([sys.executable, "-c", LLAMA_CPP_RUN, args.gguf, *peer_args],
                                                  args.threads)
    elif args.gguf:
        print("llama-cpp-python does not import: no llama.cpp row", file=sys.stderr)
    rounds = [(name, measure) for _ in range(args.repeat) for name, measure in engines.items()]
    runs: dict[str, list[dict]] = {name: [] for name in engines}
    for name, measure in progress(rounds, total=len(rounds), desc="runs"):
        runs[name].append(measure())
    rows = {name: median_row(results) for name, results in runs.items()}
    base = rows["transformers bf16"]
    bandwidth, active = read_bandwidth(args.threads), active_weights(path)
    checkpoint_mb = sum(f.stat().st_size for f in path.glob("*.safetensors")) / (1024 * 1024)
    lines = [f"### {args.model}, {args.threads} threads, prompt {args.prompt_tokens}, {args.new_tokens} new tokens",
             "", f"{cpu_description()}; {time.strftime('%Y-%m-%d')}; `python benchmarks/bench_cpu.py --model "
             f"{args.model} --threads {args.threads} --repeat {args.repeat}`; medians of {args.repeat} interleaved "
             f"runs; model MB: peak RSS above the RSS after the framework's import, × the checkpoint's "
             f"{checkpoint_mb:.0f} MB", "",
             f"; memory limit: {active / 1e6:.0f}M weights read per decoded token (the chosen experts only) at the "
             f"same run's read bandwidth of {bandwidth / 1e9:.1f} GB/s", "",
             "| engine | import s | load s | TTFT ms | prefill tok/s | decode tok/s | prefill × | decode × | "
             "decode / memory limit | peak RSS MB | model MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        if "error" in row:
            lines.append(f"| {name} | error: {row['error']} | | | | | | | | | |")
            continue
        ratio = (lambda key: f"{row[key] / base[key]:.2f}") if "error" not in base else (lambda key: "?")
        model = row["model_rss_mb"]
        model_cell = "?" if model is None else f"{model:.0f} ({model / checkpoint_mb:.2f}×)"
        width = BYTES_PER_WEIGHT.get(name)
        limit = "" if width is None else f"{row['decode_tok_s'] / (bandwidth / (active * width)):.0%}"
        lines.append(f"| {name} | {row['import_s']:.2f} | {row['load_s']:.2f} | {row['ttft_s'] * 1000:.0f} | "
                     f"{row['prefill_tok_s']:.0f} | {row['decode_tok_s']:.1f} | {ratio('prefill_tok_s')} | "
                     f"{ratio('decode_tok_s')} | {limit} | {row['peak_rss_mb']:.0f} | {model_cell} |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.write:
        with open(args.write, "a", encoding="utf-8") as handle:
            handle.write("\n" + table)


if __name__ == "__main__":
    main()
