"""Side-by-side CPU benchmark: polylm (torch backend; bf16, fp32 compute, int8, int4) against transformers bf16,
llama.cpp (bf16, Q8_0, Q4_0 through its own llama-bench, built by bench_llama_cpp.py) and mlx-lm (bf16, when it
imports) — same checkpoint, token counts and threads, one run.

    python benchmarks/bench_cpu.py [--model gemma-bench|bloom-bench|mixtral-bench] [--threads 2]
                                   [--prompt-tokens 128[,512,2048]] [--depths 128,1024,2048] [--new-tokens 64]
                                   [--llama-cpp bf16,q8_0,q4_0|none] [--repeat 3] [--skip mlx-lm,fp32]
                                   [--write RESULTS.md]

Each engine runs in its own process (so peak RSS and thread pools don't mix), once per token count: a run at N
tokens measures the prefill of an N-token prompt and the decode right after it (at depth N). Ratios are against
transformers bf16 and llama.cpp at the same precision in the same run. The first prompt length gives the main
table; more prompt lengths add a prefill table, `--depths` a decode-at-depth table.
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
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).parent))
import bench_llama_cpp as llama_cpp  # noqa: E402
from models import CONFIGS, build  # noqa: E402

from polylm.errors import PolylmError  # noqa: E402
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
from typing import NamedTuple
from bench_mlx import mlx_lm_engine""", load="""
mx.set_default_device(mx.cpu)
engine = mlx_lm_engine(Path(path), "bfloat16")
vocab = json.loads((Path(path) / "config.json").read_text())["vocab_size"]
def generate(ids, count):
    return engine(ids, count)""")


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


def polylm_run(path: Path, args, tokens: int, quantize: str | None = None, dtype: str = "bfloat16") -> dict:
    command = [sys.executable, "-m", "polylm", "bench", "--model", str(path), "--backend", "torch", "--dtype", dtype,
               "--prompt-tokens", str(tokens), "--new-tokens", str(args.new_tokens), "--json"]
    return run(command + (["--quantize", quantize] if quantize else []), args.threads)


def llama_cpp_run(binaries: Path, model: Path, args, tokens: int) -> dict:
    """llama.cpp in a row like the others' (llama-bench -r 1): the prefill of a `tokens` prompt when it is one of
    the prompt lengths, the decode at depth `tokens` when it is one of the depths; its prompt time as TTFT; no
    import, load or model memory of its own."""
    try:
        found = llama_cpp.measure(binaries, model, threads=args.threads, repeat=1,
                                  prompts=[tokens] if tokens in args.prompt_tokens else [],
                                  depths=[tokens] if tokens in decode_depths(args) else [], new_tokens=args.new_tokens)
    except PolylmError as error:
        return {"error": str(error)}
    prefill = found.prefill.get(tokens)
    return {"import_s": None, "load_s": None, "ttft_s": None if prefill is None else tokens / prefill,
            "prefill_tok_s": prefill, "decode_tok_s": found.decode.get(tokens), "peak_rss_mb": found.peak_rss_mb,
            "model_rss_mb": None, "bytes_per_weight": found.bytes_per_weight}


def llama_cpp_engines(path: Path, args) -> dict[str, Callable[[int], dict]]:
    """A llama.cpp engine per `--llama-cpp` precision (built and converted first, so no timed run pays for it);
    none, with a note, where llama.cpp cannot be built here."""
    precisions = [] if args.llama_cpp == "none" else args.llama_cpp.split(",")
    if not precisions:
        return {}
    try:
        binaries = llama_cpp.build()
    except PolylmError as error:
        print(f"no llama.cpp rows: {error}", file=sys.stderr)
        return {}
    engines = {}
    for precision in precisions:
        try:
            model = llama_cpp.gguf(path, precision, binaries)
            engines[llama_cpp.label(precision)] = lambda tokens, model=model: llama_cpp_run(binaries, model, args,
                                                                                            tokens)
        except PolylmError as error:
            engines[llama_cpp.label(precision)] = lambda tokens, error=str(error): {"error": error}
    return engines


def median_row(results: list[dict]) -> dict:
    """Each figure's median over an engine's runs (labels, and figures a run could not measure — None — as the
    first run gives them); the first error if any run failed."""
    failed = next((r for r in results if "error" in r), None)
    if failed is not None:
        return failed
    return {key: statistics.median(r[key] for r in results) if isinstance(value, (int, float)) else value
            for key, value in results[0].items()}


#: Bytes a block matrix's (or an untied head's) weight takes per precision: bf16; int8 codes (+ a float32 scale
#: per row, negligible); int4 codes and a bfloat16 scale per 32.
BYTES_PER_WEIGHT = {"polylm bf16": 2.0, "polylm int8": 1.0, "polylm int4": 0.5 + 2 / 32}
#: Bytes a tied head's weight takes: the embedding table's scheme (`Quantization.embedding`: int8 for both presets).
TIED_HEAD_BYTES_PER_WEIGHT = {"polylm bf16": 2.0, "polylm int8": 1.0, "polylm int4": 1.0}
#: The llama.cpp row each polylm precision is compared with.
LLAMA_CPP_PEER = {"polylm bf16": "llama.cpp bf16", "polylm int8": "llama.cpp Q8_0", "polylm int4": "llama.cpp Q4_0"}


class ActiveWeights(NamedTuple):
    """Weights a decoded token reads: every block matrix but the experts a token does not choose (top-k of each
    mixture-of-experts layer), and the head (one embedding row is negligible), which may be tied."""

    blocks: int
    head: int
    tied: bool

    def bytes_read(self, name: str, row: dict) -> float | None:
        """Bytes engine `name` reads per decoded token, each matrix at its stored precision (llama.cpp: its GGUF's
        mean bytes per weight); None where unknown."""
        if "bytes_per_weight" in row:
            return (self.blocks + self.head) * row["bytes_per_weight"]
        if name not in BYTES_PER_WEIGHT:
            return None
        head = (TIED_HEAD_BYTES_PER_WEIGHT if self.tied else BYTES_PER_WEIGHT)[name]
        return self.blocks * BYTES_PER_WEIGHT[name] + self.head * head


def active_weights(path: Path) -> ActiveWeights:
    """The weights a decoded token of the model at `path` reads (see `ActiveWeights`)."""
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
    return ActiveWeights(total, ir.head.out_features * ir.hidden_size, ir.head.tied_to_embedding)


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
    """The CPU's model, cores and ISA extensions (AVX2 … AMX: yes/no), and a forced polylm kernel path."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    forced = os.environ.get("POLYLM_GEMV_ISA", "auto")
    return (f"{model}, {os.cpu_count()} cores ({llama_cpp.isa_summary(llama_cpp.cpu_flags(info))})"
            + ("" if forced == "auto" else f", POLYLM_GEMV_ISA={forced}"))


def decode_depths(args) -> list[int]:
    """The depths decode is shown at: `--depths`, and the first prompt length (the main table's)."""
    return sorted(set(args.depths) | {args.prompt_tokens[0]})


def figure(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def ratio(row: dict, peer: dict | None, key: str) -> str:
    """row[key] / peer[key] as "0.43", "" without a measured peer figure."""
    if peer is None or "error" in peer or row.get(key) is None or peer.get(key) is None:
        return ""
    return f"{row[key] / peer[key]:.2f}"


def main_table(rows: dict[str, dict], checkpoint_mb: float, active: ActiveWeights, bandwidth: float) -> list[str]:
    """One row per engine at the first prompt length: import, load, TTFT, prefill and decode, their ratios to
    transformers bf16 and to llama.cpp at the same precision, decode against the memory limit, memory."""
    base = rows["transformers bf16"]
    lines = [("| engine | import s | load s | TTFT ms | prefill tok/s | decode tok/s | prefill × transformers | "
              "decode × transformers | prefill × llama.cpp | decode × llama.cpp | decode / memory limit | "
              "peak RSS MB | model MB |"), "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        if "error" in row:
            lines.append(f"| {name} | error: {row['error']} |" + " |" * 11)
            continue
        peer = rows.get(LLAMA_CPP_PEER.get(name, ""))
        model = row["model_rss_mb"]
        read = active.bytes_read(name, row)
        limit = "" if read is None or row["decode_tok_s"] is None else f"{row['decode_tok_s'] / (bandwidth / read):.0%}"
        ttft = None if row["ttft_s"] is None else row["ttft_s"] * 1000
        lines.append(f"| {name} | {figure(row['import_s'], '.2f')} | {figure(row['load_s'], '.2f')} | "
                     f"{figure(ttft, '.0f')} | {figure(row['prefill_tok_s'], '.0f')} | "
                     f"{figure(row['decode_tok_s'], '.1f')} | {ratio(row, base, 'prefill_tok_s')} | "
                     f"{ratio(row, base, 'decode_tok_s')} | {ratio(row, peer, 'prefill_tok_s')} | "
                     f"{ratio(row, peer, 'decode_tok_s')} | {limit} | {row['peak_rss_mb']:.0f} | "
                     f"{'?' if model is None else f'{model:.0f} ({model / checkpoint_mb:.2f}×)'} |")
    return lines


def length_table(rows: dict[tuple[str, int], dict], engines: list[str], lengths: list[int], key: str, title: str,
                 spec: str) -> list[str]:
    """`key` of each engine at each length, as "550 (0.43×, 1.13×)": its ratios to transformers bf16 and to
    llama.cpp at the same precision; a last column: the last length's figure over the first's."""
    lines = [f"| engine | {' | '.join(f'{title} {n}' for n in lengths)} | {lengths[-1]} / {lengths[0]} |",
             "|---|" + "---|" * (len(lengths) + 1)]
    for name in engines:
        cells = []
        for tokens in lengths:
            row = rows[name, tokens]
            if "error" in row or row.get(key) is None:
                cells.append(row.get("error", "—"))
                continue
            peers = [p for p in ("transformers bf16", LLAMA_CPP_PEER.get(name)) if p and name != "transformers bf16"]
            ratios = [ratio(row, rows.get((peer, tokens)), key) for peer in peers]
            shown = ", ".join(f"{r}×" if r else "—" for r in ratios)
            cells.append(format(row[key], spec) + (f" ({shown})" if shown else ""))
        first, last = rows[name, lengths[0]].get(key), rows[name, lengths[-1]].get(key)
        fall = f"{last / first:.0%}" if first and last else ""
        lines.append(f"| {name} | {' | '.join(cells)} | {fall} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma-bench", choices=sorted(CONFIGS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=llama_cpp.numbers, default=[128], metavar="N[,N...]",
                        help="prompt lengths for the prefill (the first: the main table's)")
    parser.add_argument("--depths", type=llama_cpp.numbers, default=[], metavar="N,N,...",
                        help="context lengths to decode at (a table of its own), e.g. 128,1024,2048")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--llama-cpp", default=",".join(llama_cpp.PRECISIONS), metavar="PRECISIONS",
                        help="llama.cpp precisions to run (comma-separated), or none; the first run builds llama.cpp "
                             "(minutes) and converts the checkpoint, both cached")
    parser.add_argument("--repeat", type=int, default=3,
                        help="rounds over all engines (interleaved, so that a shared machine's slow spells hit "
                             "every engine alike); the tables show each figure's median")
    parser.add_argument("--skip", type=lambda text: [part for part in text.split(",") if part], default=[],
                        metavar="WORD[,WORD...]", help="leave out the engines whose name contains one of these words "
                        "(e.g. mlx-lm,fp32: those whose long prompts take minutes)")
    parser.add_argument("--write", default=None, metavar="FILE", help="append the tables to this Markdown file")
    args = parser.parse_args()
    path = build(args.model)
    lengths = sorted(set(args.prompt_tokens) | set(args.depths))
    engines: dict[str, Callable[[int], dict]] = {
        "transformers bf16": lambda tokens: run([sys.executable, "-c", TRANSFORMERS_RUN, str(path), str(tokens),
                                                 str(args.new_tokens)], args.threads),
        "polylm bf16": lambda tokens: polylm_run(path, args, tokens),
        "polylm fp32 compute": lambda tokens: polylm_run(path, args, tokens, dtype="float32"),
        "polylm int8": lambda tokens: polylm_run(path, args, tokens, "int8"),
        "polylm int4": lambda tokens: polylm_run(path, args, tokens, "int4"),
    }
    if importable("mlx_lm"):
        engines["mlx-lm bf16 (CPU)"] = lambda tokens: run(
            [sys.executable, "-c", MLX_LM_RUN, str(path), str(tokens), str(args.new_tokens), str(args.threads)],
            args.threads)
    engines |= llama_cpp_engines(path, args)
    engines = {name: measure for name, measure in engines.items() if not any(word in name for word in args.skip)}
    rounds = [(name, tokens, measure) for _ in range(args.repeat) for tokens in lengths
              for name, measure in engines.items()]
    runs: dict[tuple[str, int], list[dict]] = {(name, tokens): [] for name in engines for tokens in lengths}
    for name, tokens, measure in progress(rounds, total=len(rounds), desc="runs"):
        runs[name, tokens].append(measure(tokens))
    rows = {key: median_row(results) for key, results in runs.items()}
    bandwidth, active = read_bandwidth(args.threads), active_weights(path)
    checkpoint_mb = sum(f.stat().st_size for f in path.glob("*.safetensors")) / (1024 * 1024)
    first = args.prompt_tokens[0]
    command = (f"python benchmarks/bench_cpu.py --model {args.model} --threads {args.threads} --prompt-tokens "
               f"{','.join(map(str, args.prompt_tokens))}" + (f" --depths {','.join(map(str, args.depths))}"
                                                              if args.depths else "")
               + f" --new-tokens {args.new_tokens} --llama-cpp {args.llama_cpp} --repeat {args.repeat}"
               + (f" --skip {','.join(args.skip)}" if args.skip else ""))
    caption = [(f"{cpu_description()}; {time.strftime('%Y-%m-%d')}; `{command}`; medians of {args.repeat} "
                "interleaved runs.")]
    if any(name.startswith("llama.cpp") for name in engines):
        caption.append(f"llama.cpp: llama-cpp-python {llama_cpp.VERSION}'s vendored source built with "
                       f"{llama_cpp.built_with(llama_cpp.cpu_flags())}, measured by its llama-bench (-r 1 a run); "
                       "its TTFT is llama-bench's prompt time, and it has no import, load or model MB figures.")
    tables = [f"### {args.model}, {args.threads} threads, prompt {first}, {args.new_tokens} new tokens", "",
              *caption, "", (f"Model MB: the peak RSS above the RSS after the framework's import, × the checkpoint's "
                             f"{checkpoint_mb:.0f} MB. Decode / memory limit: the decode rate over the rate at which "
                             f"the same run's read bandwidth of {bandwidth / 1e9:.1f} GB/s streams the "
                             f"{(active.blocks + active.head) / 1e6:.0f}M weights a decoded token reads (the chosen "
                             f"experts only; the {'tied ' if active.tied else ''}head's {active.head / 1e6:.0f}M "
                             "included) at the bytes each engine stores them in: polylm's block matrices at its "
                             "precision, its head at the stored one (a tied head: the embedding table's, int8 for "
                             "int8 and int4; bf16 unquantized); llama.cpp at its GGUF's mean."), "",
              *main_table({name: rows[name, first] for name in engines}, checkpoint_mb, active, bandwidth)]
    explained = [*caption, ("Cells: tok/s (× transformers bf16, × llama.cpp at the same precision); the last "
                            "column: the figure at the last length over the one at the first."), ""]
    if len(args.prompt_tokens) > 1:
        tables += ["", f"### {args.model}, prefill tok/s by prompt length, {args.threads} threads", "", *explained,
                   *length_table(rows, list(engines), sorted(args.prompt_tokens), "prefill_tok_s", "prompt", ".0f")]
    if args.depths:
        tables += ["", (f"### {args.model}, decode tok/s by depth ({args.new_tokens} new tokens after that many), "
                        f"{args.threads} threads"), "", *explained,
                   *length_table(rows, list(engines), sorted(args.depths), "decode_tok_s", "depth", ".1f")]
    table = "\n".join(tables) + "\n"
    print(table)
    if args.write:
        with open(args.write, "a", encoding="utf-8") as handle:
            handle.write("\n" + table)


if __name__ == "__main__":
    main()
