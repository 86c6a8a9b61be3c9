"""Triton backend vs the torch backend on one CUDA GPU, for ~1B-parameter Gemma and BLOOM (random weights).

Prints, per model and batch size: prefill tok/s and decode tok/s for both backends, and the Triton decode
step's bandwidth — bytes of weights and KV cache read per step ÷ step time — as a fraction of the GPU's
measured device-to-device copy bandwidth. Triton decode runs through `DecodeGraph` (one CUDA graph per
step); the torch backend's ops read host values, so it runs eagerly (its reference attention is SDPA).

    python benchmarks/bench_triton.py                      # both models, batch 1 and 16, bfloat16
    python benchmarks/bench_triton.py --models gemma-1b --batches 1 --prompt 1024 --decode 256

Needs a CUDA GPU and triton; exits with a message otherwise. Checkpoints are written to a temporary
directory with transformers (about 2 GB each) and removed afterwards.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from models import random_model  # noqa: E402

MODELS = {
    # 8 heads of 256 sharing one KV head, GeGLU: 1.02B parameters (393M of them the tied embedding)
    "gemma-1b": ("gemma", dict(vocab_size=256000, hidden_size=1536, intermediate_size=8192, num_hidden_layers=14,
                               num_attention_heads=8, num_key_value_heads=1, head_dim=256,
                               max_position_embeddings=8192)),
    # bloom-1b1's shape: 16 heads of 96, ALiBi, 1.07B parameters
    "bloom-1b": ("bloom", dict(vocab_size=250880, hidden_size=1536, n_layer=24, n_head=16)),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--prompt", type=int, default=512, help="prompt tokens per row (prefill)")
    parser.add_argument("--decode", type=int, default=128, help="decode steps timed")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    problem = _cannot_run()
    if problem:
        print(f"bench_triton: {problem}", file=sys.stderr)
        return 2
    import torch

    device = torch.cuda.get_device_name()
    copy_bandwidth = measure_copy_bandwidth()
    print(f"GPU: {device}; device-to-device copy bandwidth {copy_bandwidth / 1e9:.0f} GB/s; dtype {args.dtype}; "
          f"prompt {args.prompt} tokens, {args.decode} decode steps")
    results = {"gpu": device, "copy_bandwidth_gbs": copy_bandwidth / 1e9, "dtype": args.dtype,
               "prompt": args.prompt, "decode_steps": args.decode, "command": " ".join(sys.argv), "rows": []}
    with tempfile.TemporaryDirectory(prefix="polylm-bench-") as scratch:
        for name in args.models:
            directory = build_checkpoint(name, Path(scratch) / name, args.dtype)
            for row in bench_model(name, directory, args, copy_bandwidth):
                results["rows"].append(row)
                print(format_row(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def _cannot_run() -> str | None:
    """Why this machine cannot run the benchmark, or None."""
    if os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes"):
        return "TRITON_INTERPRET is set; the benchmark needs compiled kernels on a CUDA GPU (unset it)"
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "needs a CUDA GPU, and none is visible here (torch.cuda.is_available() is False)"
    try:
        import triton  # noqa: F401
    except ImportError:
        return 'triton is not installed (pip install "polylm[triton]")'
    return None


def measure_copy_bandwidth(size_bytes: int = 1 << 30, repeats: int = 10) -> float:
    """Best device-to-device copy rate in bytes/s, counting each byte read and written (2 × size per copy)."""
    import torch

    source = torch.empty(size_bytes, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    target.copy_(source)
    best = float("inf")
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        target.copy_(source)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    del source, target
    torch.cuda.empty_cache()
    return 2 * size_bytes / best


def build_checkpoint(name: str, directory: Path, dtype: str) -> Path:
    """A random-weight checkpoint of `name` written with transformers (initialized on the GPU for speed)."""
    import torch

    family, options = MODELS[name]
    model = random_model(family, options, dtype, device="cuda")
    model.save_pretrained(directory)
    parameters = sum(p.numel() for p in model.parameters())
    print(f"{name}: {parameters / 1e9:.2f}B parameters", flush=True)
    del model
    torch.cuda.empty_cache()
    return directory


def bench_model(name: str, directory: Path, args: argparse.Namespace, copy_bandwidth: float) -> list[dict]:
    import torch

    import polylm
    from polylm_torch_common.ops import ReferenceOps

    triton_runtime = polylm.load(directory, backend="triton", dtype=args.dtype).runtime
    # the plain-torch reference ops on the same GPU tensors (TorchBackend itself lowers to the CPU)
    torch_runtime = copy.copy(triton_runtime)
    torch_runtime.ops = ReferenceOps()
    weight_bytes = weights_read_per_step(triton_runtime)
    rows = []
    for batch in args.batches:
        row = {"model": name, "batch": batch}
        for label, runtime in (("triton", triton_runtime), ("torch", torch_runtime)):
            row[f"{label}_prefill_tok_s"] = batch * args.prompt / time_prefill(runtime, batch, args.prompt, args.decode)
        step, replay = time_decode_graph(triton_runtime, batch, args.prompt, args.decode)
        row["triton_decode_tok_s"] = batch / step
        row["triton_decode_replay_tok_s"] = batch / replay
        row["triton_eager_decode_tok_s"] = batch / time_decode_eager(triton_runtime, batch, args.prompt, args.decode)
        row["torch_decode_tok_s"] = batch / time_decode_eager(torch_runtime, batch, args.prompt, args.decode)
        average_context = args.prompt + args.decode / 2
        step_bytes = weight_bytes + kv_bytes_read(triton_runtime, batch, average_context)
        row["decode_bytes_per_step"] = step_bytes
        row["decode_bandwidth_fraction"] = step_bytes / step / copy_bandwidth
        row["decode_replay_bandwidth_fraction"] = step_bytes / replay / copy_bandwidth
        rows.append(row)
        torch.cuda.empty_cache()
    return rows


def _steps(runtime, batch: int, prompt: int, decode: int):
    """The prefill step and a maker of decode steps, unpadded."""
    from polylm.backend import Step

    total = prompt + decode + 1
    rng = np.random.default_rng(0)
    ids = rng.integers(3, runtime.ir.embedding.vocab_size, size=(batch, prompt))
    positions = np.broadcast_to(np.arange(total), (batch, total))
    mask = np.ones((batch, total), dtype=bool)
    prefill = Step(ids, positions[:, :prompt], mask[:, :prompt], gather=np.full(batch, prompt - 1))

    def decode_step(slot: int, tokens: np.ndarray) -> Step:
        return Step(tokens[:, None], positions[:, :slot + 1], mask[:, :slot + 1], gather=np.zeros(batch, np.int64))

    return prefill, decode_step, total


def time_prefill(runtime, batch: int, prompt: int, decode: int, repeats: int = 3) -> float:
    prefill, _, total = _steps(runtime, batch, prompt, decode)
    runtime.forward(prefill, runtime.new_cache(batch, total))  # compile / warm up
    best = float("inf")
    for _ in range(repeats):
        cache = runtime.new_cache(batch, total)
        start = time.perf_counter()
        runtime.forward(prefill, cache)  # returns host logits: synchronized
        best = min(best, time.perf_counter() - start)
    return best


def time_decode_graph(runtime, batch: int, prompt: int, decode: int) -> tuple[float, float]:
    """(seconds per decode step as generation sees it — logits to host included —, seconds per bare replay)."""
    import torch

    from polylm_triton.graph import DecodeGraph

    prefill, decode_step, total = _steps(runtime, batch, prompt, decode)
    cache = runtime.new_cache(batch, total)
    logits = runtime.forward(prefill, cache)
    graph = DecodeGraph(runtime, cache)
    slot = prompt
    for _ in range(3):  # warm up
        logits = graph.step(decode_step(slot, logits.argmax(-1)))
        slot += 1
    start = time.perf_counter()
    for _ in range(decode - 3):
        logits = graph.step(decode_step(slot, logits.argmax(-1)))
        slot += 1
    step = (time.perf_counter() - start) / (decode - 3)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(decode):
        graph.graph.replay()
    torch.cuda.synchronize()
    return step, (time.perf_counter() - start) / decode


def time_decode_eager(runtime, batch: int, prompt: int, decode: int) -> float:
    prefill, decode_step, total = _steps(runtime, batch, prompt, decode)
    cache = runtime.new_cache(batch, total)
    logits = runtime.forward(prefill, cache)
    slot = prompt
    for _ in range(3):
        logits = runtime.forward(decode_step(slot, logits.argmax(-1)), cache)
        slot += 1
    start = time.perf_counter()
    for _ in range(decode - 3):
        logits = runtime.forward(decode_step(slot, logits.argmax(-1)), cache)
        slot += 1
    return (time.perf_counter() - start) / (decode - 3)


def weights_read_per_step(runtime) -> int:
    """Bytes of parameters one decode step reads: every block and norm tensor and the head's matrix (the
    embedding table itself only for the few rows looked up, negligible)."""
    params = runtime.params
    tensors = [params.head] + ([params.head_bias] if params.head_bias is not None else [])
    for layer in params.layers:
        tensors += [t for t in vars(layer).values() if hasattr(t, "nbytes")]
        tensors += [t for norm in (layer.attn_norm, layer.mlp_norm) for t in (norm.weight, norm.bias) if t is not None]
    for norm in (params.final_norm, params.embed_norm):
        if norm is not None:
            tensors += [t for t in (norm.weight, norm.bias) if t is not None]
    return sum(t.nbytes for t in tensors)


def kv_bytes_read(runtime, batch: int, context: float) -> float:
    attn = runtime.ir.attention
    element = runtime.params.embed.element_size()
    return 2 * runtime.ir.num_layers * batch * attn.num_kv_heads * attn.head_dim * context * element


def format_row(row: dict) -> str:
    return (f"{row['model']:>9} batch {row['batch']:>3} | prefill tok/s: triton {row['triton_prefill_tok_s']:>8.0f}"
            f"  torch {row['torch_prefill_tok_s']:>8.0f}"
            f" | decode tok/s: triton graph {row['triton_decode_tok_s']:>7.1f} (replay only {row['triton_decode_replay_tok_s']:>7.1f})"
            f"  triton eager {row['triton_eager_decode_tok_s']:>7.1f}  torch {row['torch_decode_tok_s']:>7.1f}"
            f" | decode bandwidth {row['decode_bandwidth_fraction']:.0%} of copy"
            f" (replay only {row['decode_replay_bandwidth_fraction']:.0%})")


if __name__ == "__main__":
    sys.exit(main())
