"""Compile every kernel of the Triton backend for a CUDA architecture without a GPU: Triton's compiler down to PTX
and ptxas to a cubin. It catches what the CPU interpreter accepts but the GPU compiler rejects (dot shapes,
mixed dot operand types, constexpr misuse) and reports each kernel's registers, spills and shared memory,
with the launchers' own pinned configurations at representative ~1B-model shapes.

    TRITON_INTERPRET=0 python scripts/triton_aot.py [--arch 90] [--dtypes bfloat16 float32] [--quick]

Exits non-zero when a kernel fails to compile or needs more shared memory than a consumer GPU's 99 KB.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SHARED_LIMIT = 99 * 1024
_FLOAT_ARGS = ("eps", "scale", "score_scale", "cap_log2")
_POINTERS = {"ids_ptr": "*i64", "experts_ptr": "*i64", "route_ptr": "*fp32", "index_ptr": "*i64", "positions_ptr": "*i64", "slots_ptr": "*i32",
             "query_positions_ptr": "*i64",
             "mask_ptr": "*i1", "cos_ptr": "*fp32", "sin_ptr": "*fp32", "slopes_ptr": "*fp32",
             "max_ptr": "*fp32", "sum_ptr": "*fp32", "acc_ptr": "*fp32"}
_TRITON_TYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def cases(dtype: str, quick: bool = False) -> list[tuple[str, object, dict, dict, dict]]:
    """(label, kernel, pointer types, constexprs, options) for every kernel at representative shapes."""
    from polylm_triton import activation, attention, experts, gather, norm, quantized, rope
    from polylm_triton.config import row_tile, warps

    data = f"*{_TRITON_TYPES[dtype]}"
    exact = dtype == "float32"
    found = []
    for label, rows, head_dim, group, alibi, softcap, split, window, sinks in (
            ("prefill, 8 heads of 256 on 1 KV head", 512, 256, 8, False, False, False, 0, False),
            ("prefill, softcap, 8 heads of 256 on 1", 512, 256, 8, False, True, False, 0, False),
            ("decode, split-KV, softcap, 8 heads of 256 on 1", 1, 256, 8, False, True, True, 0, False),
            ("decode, split-KV, ALiBi, heads of 96", 1, 96, 1, True, False, True, 0, False),
            ("prefill, ALiBi, heads of 96", 512, 96, 1, True, False, False, 0, False),
            ("decode, split-KV, sliding-window ring, softcap, 4 heads of 128 on 1", 1, 128, 4, False, True, True, 4096,
             False),
            ("prefill, sliding-window ring, ALiBi, heads of 96", 512, 96, 1, True, False, False, 4096, False),
            ("prefill, sinks, sliding-window ring, 8 heads of 64 on 1", 512, 64, 8, False, False, False, 128, True),
            ("decode, split-KV, sinks, 8 heads of 64 on 1", 1, 64, 8, False, False, True, 0, True)):
        tiles = attention.attention_tiles(head_dim, rows * group, exact)
        options = {k: tiles.pop(k) for k in ("num_warps", "num_stages")}
        constexprs = dict(NUM_HEADS=8 * group, NUM_KV_HEADS=8, HEAD_DIM=head_dim, HAS_ALIBI=alibi, SOFTCAP=softcap,
                          WINDOW=window, HAS_SINKS=sinks, SPLIT=split, **tiles)
        found.append((f"attention: {label}", attention._attention_kernel,
                      {"out_ptr": "*fp32" if split else data}, constexprs, options))
    found.append(("attention: merge splits", attention._merge_splits_kernel, {"out_ptr": data},
                  dict(HEAD_DIM=96, BLOCK_S=8, BLOCK_D=128), dict(num_warps=1)))
    if quick and exact:
        return found
    block_rows, block_cols, num_warps = row_tile(16, 2048)
    for kind in ("rms", "layer"):
        found.append((f"add_norm: {kind}, residual, bias", norm._add_norm_kernel, {"weight_ptr": "*fp32"},
                      dict(HAS_DELTA=True, IS_RMS=kind == "rms", HAS_BIAS=True, BLOCK_ROWS=block_rows,
                           BLOCK_COLS=block_cols), dict(num_warps=num_warps)))
    found.append(("embed: scale, layer norm", norm._embed_kernel, {},
                  dict(HAS_SCALE=True, HAS_NORM=True, IS_RMS=False, HAS_BIAS=True, BLOCK_ROWS=block_rows,
                       BLOCK_COLS=block_cols), dict(num_warps=num_warps)))
    for label, heads, kv_heads, head_dim, rotary_dim, interleaved in (("interleaved, partial", 8, 1, 80, 40, True),
                                                                      ("half-split", 8, 1, 256, 256, False),
                                                                      ("none (ALiBi)", 16, 16, 96, 2, False)):
        block_d = 1 << (head_dim - 1).bit_length()
        found.append((f"rope_and_cache: {label}", rope._rope_and_cache_kernel, {},
                      dict(NUM_HEADS=heads, NUM_KV_HEADS=kv_heads, HEAD_DIM=head_dim, ROTARY_DIM=rotary_dim,
                           INTERLEAVED=interleaved, HAS_ROPE=label != "none (ALiBi)", BLOCK_ROWS=4096 // block_d,
                           BLOCK_D=block_d), dict(num_warps=warps(4096))))
    for name in ("silu", "gelu_tanh", "gelu", "relu", "relu2"):
        found.append((f"activation: {name}, gated", activation._activation_kernel, {},
                      dict(ACTIVATION=name, GATED=True, BLOCK_ROWS=4, BLOCK_COLS=1024), dict(num_warps=warps(4096))))
    found.append(("gather", gather._gather_kernel, {}, dict(BLOCK_COLS=2048), dict(num_warps=warps(2048))))
    for bits, group_size in ((8, None), (4, 32), (8, 48)):
        for rows in (1, 4, 512):
            tiles = quantized.matmul_tiles(rows, group_size, exact)
            options = {"num_warps": tiles.pop("num_warps")}
            found.append((f"quantized matmul: int{bits}, groups of {group_size or 'a row'}, {rows} rows",
                          quantized._quantized_matmul_kernel, {"w_ptr": "*i8" if bits == 8 else "*u8"},
                          dict(BITS=bits, HAS_BIAS=True, EXACT=exact, **tiles), options))
    for bits, group_size in ((0, None), (8, None), (4, 32)):
        for rows in (1, 512):  # an expert's rows: decode, prefill
            tiles = quantized.matmul_tiles(rows, group_size, exact)
            options = {"num_warps": tiles.pop("num_warps")}
            if not bits:
                tiles["SCALE_MODE"] = experts._FLOAT
            weights = {0: data, 8: "*i8", 4: "*u8"}[bits]
            found.append((f"grouped expert matmul: {f'int{bits}' if bits else 'float'}, {rows} rows an expert",
                          experts._grouped_matmul_kernel, {"w_ptr": weights},
                          dict(BITS=bits, HAS_BIAS=True, HAS_ROUTE=True, EXACT=exact, **tiles), options))
    return found


def compile_kernel(kernel, dtype: str, pointers: dict, constexprs: dict, options: dict, arch: int):
    """The compiled kernel, with pointer and stride arguments assumed 16-divisible (as the JIT specializes)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(kernel.arg_names)
    signature = {}
    for name in names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = pointers.get(name, _POINTERS.get(name, f"*{_TRITON_TYPES[dtype]}"))
        else:
            signature[name] = "fp32" if name in _FLOAT_ARGS else "i32"
    aligned = [n for n in names if n.endswith("_ptr") or n.startswith("stride_")]
    source = ASTSource(fn=kernel, signature=signature,
                       constexprs={(names.index(k),): v for k, v in constexprs.items()},
                       attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned})
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def resources(compiled) -> str:
    """Registers, stack (spills) and static shared memory as cuobjdump reports them for the cubin."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        report = subprocess.run([str(tool), "--dump-resource-usage", cubin.name], capture_output=True, text=True)
    line = next((line for line in report.stdout.splitlines() if "REG:" in line), "")
    return " ".join(part for part in line.split() if part.split(":")[0] in ("REG", "STACK"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability × 10 (80 A100, 90 H100)")
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=list(_TRITON_TYPES))
    parser.add_argument("--quick", action="store_true", help="float32: only the attention kernels")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes"):
        print("aot: unset TRITON_INTERPRET: the interpreter replaces the compiler", file=sys.stderr)
        return 2
    failures = 0
    for dtype in args.dtypes:
        for label, kernel, pointers, constexprs, options in cases(dtype, args.quick):
            try:
                compiled = compile_kernel(kernel, dtype, pointers, constexprs, options, args.arch)
            except Exception as exc:  # noqa: BLE001 - report every kernel, then fail
                failures += 1
                print(f"FAIL  sm_{args.arch} {dtype:>8}  {label}: {type(exc).__name__}: {exc}")
                continue
            shared = compiled.metadata.shared
            too_big = shared > SHARED_LIMIT
            failures += too_big
            print(f"{'FAIL' if too_big else 'ok':<5} sm_{args.arch} {dtype:>8}  {label:<48} shared {shared:>6} B  "
                  f"{resources(compiled)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
