"""Prefill and decode speed of polylm's MLX backend next to mlx-lm on the same checkpoint (not a test).

Builds a Helium, Gemma or Mixtral checkpoint with random weights through transformers in a temporary directory, then
runs one greedy generation per engine with the same prompt and token counts and prints tok/s side by side.
polylm decodes through its backend-independent generation loop (`polylm.generate.scheduler.decode_batch`), which
reads each step's logits on the host; mlx-lm through its own `generate_step`. mlx-lm is skipped when it does
not import. Runs alternate between the engines and the best of `--repeats` is shown; on a busy shared
machine `--clock cpu` (this process's CPU time) gives steadier ratios than wall-clock time.

    python benchmarks/bench_mlx.py                       # Helium, 125M parameters, float32
    python benchmarks/bench_mlx.py --dtype bfloat16 --clock cpu
    python benchmarks/bench_mlx.py --family mixtral --clock cpu   # mixture-of-experts (mixtral-bench)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import CONFIGS  # noqa: E402

SIZES = {  # moderate checkpoints both engines support; head_dim = hidden / heads (mlx-lm's Helium assumes it)
    "helium": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                   num_key_value_heads=4, head_dim=64, vocab_size=32000, max_position_embeddings=4096,
                   tie_word_embeddings=False),
    "gemma": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=8,
                  num_key_value_heads=1, head_dim=96, vocab_size=32000, max_position_embeddings=4096),
    "mixtral": CONFIGS["mixtral-bench"][1],  # 8 experts, top 2 (`models`)
}


def build_checkpoint(family: str, dtype: str, directory: Path, layers: int | None) -> Path:
    import torch
    import transformers

    size = dict(SIZES[family])
    if layers:
        size["num_hidden_layers"] = layers
    config = transformers.AutoConfig.for_model(family, bos_token_id=1, eos_token_id=2, pad_token_id=0, **size)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.save_pretrained(directory)
    return directory


def timed(tokens: Iterator[int], count: int, clock: Callable[[], float]) -> tuple[float, float, list[int]]:
    """Seconds to the first token (prefill), seconds for the remaining count − 1 (decode), and the ids."""
    start = clock()
    ids = [next(tokens)]
    first = clock()
    ids += [next(tokens) for _ in range(count - 1)]
    return first - start, clock() - first, ids


def polylm_engine(directory: Path, dtype: str) -> Callable[[list[int], int], Iterator[int]]:
    import polylm
    from polylm.generate.sampling import Sampling
    from polylm.generate.scheduler import decode_batch

    model = polylm.load(directory, backend="mlx", dtype=dtype)

    def run(prompt: list[int], new: int) -> Iterator[int]:
        for (token,) in decode_batch(model.runtime, [prompt], Sampling(max_new_tokens=new), (),
                                     model.ir.context_length):
            yield token
    return run


def mlx_lm_engine(directory: Path, dtype: str) -> Callable[[list[int], int], Iterator[int]] | None:
    try:
        import mlx.core as mx
        from mlx_lm.generate import generate_step
        from mlx_lm.utils import load_model
    except ImportError as exc:
        print(f"mlx-lm: not importable ({exc}); showing polylm alone")
        return None
    # mlx-lm reads the Hub's top-level rope_theta; transformers v5 writes it inside rope_parameters
    config = json.loads((directory / "config.json").read_text())
    rope_theta = config.get("rope_theta", config.get("rope_parameters", {}).get("rope_theta", 10000.0))
    model, _ = load_model(directory, model_config={"rope_theta": rope_theta})
    model.set_dtype(getattr(mx, dtype))

    def run(prompt: list[int], new: int) -> Iterator[int]:
        greedy = lambda logprobs: mx.argmax(logprobs, axis=-1)  # noqa: E731
        for token, _ in generate_step(mx.array(prompt), model, max_tokens=new, sampler=greedy):
            yield int(token)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=sorted(SIZES), default="helium")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--layers", type=int, default=None, help="override the number of layers")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    parser.add_argument("--new", type=int, default=64, help="generated tokens")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per engine (after one warm-up)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall-clock time, or this process's CPU time (steadier on a busy shared machine)")
    args = parser.parse_args()

    import mlx.core as mx

    with tempfile.TemporaryDirectory() as tmp:
        directory = build_checkpoint(args.family, args.dtype, Path(tmp), args.layers)
        size = sum(p.stat().st_size for p in directory.glob("*.safetensors")) / 2**20
        print(f"{args.family} checkpoint: {size:.0f} MiB {args.dtype}; mlx {mx.__version__} on "
              f"{mx.default_device()}; prompt {args.prompt} tokens, {args.new} new, best of {args.repeats}, "
              f"{args.clock} clock")
        clock = time.perf_counter if args.clock == "wall" else time.process_time
        prompt = np.random.default_rng(0).integers(3, 32000, args.prompt).tolist()
        engines = {"polylm-mlx": polylm_engine(directory, args.dtype)}
        other = mlx_lm_engine(directory, args.dtype)
        if other is not None:
            engines["mlx-lm"] = other
        for name, engine in list(engines.items()):  # warm-up: compilation, caches
            try:
                timed(engine(prompt, args.new), args.new, clock)
            except RuntimeError as exc:  # e.g. mlx-lm's MoE in bf16 on the CPU: "[GatherMM::eval] ... float32"
                if name == "polylm-mlx":
                    raise
                print(f"{name}: cannot run this checkpoint here ({exc}); showing polylm alone")
                del engines[name]
        runs: dict[str, list[tuple[float, float, list[int]]]] = {name: [] for name in engines}
        for _ in range(args.repeats):  # alternate engines so a change in machine load hits both alike
            for name, engine in engines.items():
                runs[name].append(timed(engine(prompt, args.new), args.new, clock))
        results: dict[str, tuple[float, float]] = {}
        for name, timings in runs.items():
            prefill = args.prompt / min(r[0] for r in timings)
            decode = (args.new - 1) / min(r[1] for r in timings)
            results[name] = (prefill, decode)
            spread = statistics.pstdev([(args.new - 1) / r[1] for r in timings])
            print(f"  {name:11s} prefill {prefill:9.1f} tok/s   decode {decode:7.2f} tok/s (± {spread:.2f})")
    if len(results) == 2:
        (ours_prefill, ours_decode), (their_prefill, their_decode) = results["polylm-mlx"], results["mlx-lm"]
        same = sum(a == b for a, b in zip(runs["polylm-mlx"][0][2], runs["mlx-lm"][0][2]))
        print(f"  polylm/mlx-lm: prefill ×{ours_prefill / their_prefill:.2f}, decode ×{ours_decode / their_decode:.2f}"
              f"; greedy ids agree on {same}/{args.new}")


if __name__ == "__main__":
    main()
