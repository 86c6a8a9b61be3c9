"""llama.cpp as a benchmark peer: built from the source the `llama-cpp-python` sdist vendors, run through its own
`llama-bench` on GGUF conversions (bf16, Q8_0, Q4_0) of the bench checkpoints.

    python benchmarks/bench_llama_cpp.py [--model gemma-bench] [--precision bf16,q8_0,q4_0] [--threads 2]
                                         [--prompt-tokens 128,512,2048] [--depths 128,1024,2048] [--new-tokens 64]
                                         [--repeat 3]

The sdist comes from the package index (`pip download`, pinned to VERSION). cmake builds `llama-bench` and
`llama-quantize` (Release, static, `nice`) with GGML_NATIVE=OFF and every ISA option named from this CPU's
flags — AMX always off: native builds crashed in `ggml_backend_amx_mul_mat` on AMX machines. Build, source and
GGUFs are cached under ~/.cache/polylm/llama.cpp (or $POLYLM_LLAMA_CPP_DIR): the build in
`<version>-<hash of the cmake options>`, so a second run reuses it and another CPU kind gets its own.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).parent))
from models import CONFIGS  # noqa: E402
from models import build as build_checkpoint  # noqa: E402

from polylm.errors import PolylmError  # noqa: E402

VERSION = "0.3.36"
CACHE = Path(os.environ.get("POLYLM_LLAMA_CPP_DIR", Path.home() / ".cache" / "polylm" / "llama.cpp"))

#: ggml's cmake ISA options and the /proc/cpuinfo flags each needs (all of them).
ISA_OPTIONS: dict[str, tuple[str, ...]] = {
    "GGML_SSE42": ("sse4_2",),
    "GGML_AVX": ("avx",),
    "GGML_AVX2": ("avx2",),
    "GGML_FMA": ("fma",),
    "GGML_F16C": ("f16c",),
    "GGML_BMI2": ("bmi2",),
    "GGML_AVX_VNNI": ("avx_vnni",),
    "GGML_AVX512": ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"),
    "GGML_AVX512_VBMI": ("avx512vbmi",),
    "GGML_AVX512_VNNI": ("avx512_vnni",),
    "GGML_AVX512_BF16": ("avx512_bf16",),
}
#: Off whatever the CPU has (the AMX path crashed in ggml_backend_amx_mul_mat).
ALWAYS_OFF = ("GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16")
#: What the build needs apart from the ISA: static binaries, no tests/examples/server/HTTPS.
BASE_OPTIONS = ("-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DGGML_NATIVE=OFF", "-DLLAMA_OPENSSL=OFF",
                "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF")
TARGETS = ("llama-bench", "llama-quantize")


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The first `flags` line of /proc/cpuinfo (or of `cpuinfo`), as a set; empty where there is none."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text() if path.exists() else ""
    line = next((line for line in cpuinfo.splitlines() if line.startswith("flags")), "flags :")
    return frozenset(line.split(":", 1)[1].split())


def isa_options(flags: frozenset[str]) -> dict[str, bool]:
    """Each ggml ISA option on or off for a CPU with `flags` (AMX always off)."""
    chosen = {option: all(flag in flags for flag in needs) for option, needs in ISA_OPTIONS.items()}
    return chosen | {option: False for option in ALWAYS_OFF}


def cmake_options(flags: frozenset[str]) -> list[str]:
    """The cmake configure options for a CPU with `flags`: BASE_OPTIONS and every ISA option named ON or OFF."""
    return [*BASE_OPTIONS, *(f"-D{option}={'ON' if on else 'OFF'}" for option, on in isa_options(flags).items())]


def cache_key(version: str, options: list[str]) -> str:
    """The build's cache directory name: the sdist version and a hash of the cmake options."""
    return f"{version}-{hashlib.sha256(' '.join(options).encode()).hexdigest()[:12]}"


def checked(command: list[str], what: str) -> None:
    """Run `command`; a PolylmError naming `what` and the last line it printed when it fails or is missing."""
    try:
        result = subprocess.run(command, capture_output=True, text=True, check=False)
    except FileNotFoundError as error:
        raise PolylmError(f"{what}: {command[0]} is not installed") from error
    if result.returncode != 0:
        last = (result.stderr.strip() or result.stdout.strip() or "no output").splitlines()[-1]
        raise PolylmError(f"{what} failed (exit {result.returncode}): {last}")


def source(version: str = VERSION) -> Path:
    """The vendored llama.cpp of the llama-cpp-python `version` sdist (downloaded and extracted once; the sdist is
    not kept)."""
    root = CACHE / f"{version}-src"
    tree = root / "llama.cpp"
    if (tree / "CMakeLists.txt").exists():
        return tree
    root.mkdir(parents=True, exist_ok=True)
    checked([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={version}", "--no-deps", "--no-binary",
             ":all:", "-d", str(root)], f"pip download llama-cpp-python=={version}")
    prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
    sdist = root / f"llama_cpp_python-{version}.tar.gz"
    with tarfile.open(sdist) as archive:
        # not its `.git` file: it points at the sdist's own repository, which git would look for
        members = [m for m in archive.getmembers() if m.name.startswith(prefix) and m.name != prefix + ".git"]
        for member in members:
            member.name = member.name[len(prefix):]
        archive.extractall(tree, members=members, filter="data")
    sdist.unlink()
    return tree


def build(flags: frozenset[str] | None = None, version: str = VERSION) -> Path:
    """The directory holding `llama-bench` and `llama-quantize`, built for `flags` (this CPU's by default) on
    first use; prints the ISA options it builds with."""
    options = cmake_options(cpu_flags() if flags is None else flags)
    directory = CACHE / cache_key(version, options)
    binaries = directory / "build" / "bin"
    if all((binaries / target).exists() for target in TARGETS):
        return binaries
    tree = source(version)
    print(f"building llama.cpp {version} in {directory}: {' '.join(o for o in options if 'GGML_' in o)}",
          file=sys.stderr)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "cmake-options.txt").write_text("\n".join(options) + "\n")
    checked(["cmake", "-S", str(tree), "-B", str(directory / "build"), *options], f"cmake configure of {tree}")
    checked(["nice", "-n", "10", "cmake", "--build", str(directory / "build"), "--config", "Release", "-j", "2",
             "--target", *TARGETS], f"cmake build in {directory / 'build'}")
    return binaries


def isa_summary(flags: frozenset[str]) -> str:
    """The CPU's matrix-relevant ISA extensions, for a table caption: "AVX2 yes, AVX-512 no, ..."."""
    named = {"AVX2": "avx2", "AVX-512": "avx512f", "AVX-512 VNNI": "avx512_vnni", "AVX-512 BF16": "avx512_bf16",
             "AMX": "amx_tile"}
    return ", ".join(f"{name} {'yes' if flag in flags else 'no'}" for name, flag in named.items())


def label(precision: str) -> str:
    """A precision's row name: "llama.cpp bf16", "llama.cpp Q8_0"."""
    return f"llama.cpp {'bf16' if precision == 'bf16' else precision.upper()}"


def built_with(flags: frozenset[str]) -> str:
    """The ggml ISA options a build for `flags` turns on, for a table caption."""
    return " ".join(option for option, on in isa_options(flags).items() if on) + " (GGML_NATIVE and AMX off)"


#: Pieces the sentencepiece model learns; the rest of the vocabulary is `<unused{i}>` symbols (as Gemma's own
#: tokenizer has): the local training text yields at most ~16k BPE pieces, fewer than an embedding's 32000 rows.
LEARNED_PIECES = 8000


def train_tokenizer(path: Path, vocab_size: int) -> None:
    """Write a sentencepiece BPE model of exactly `vocab_size` pieces to `path`: <pad> <s> </s> <unk> (ids 0-3,
    the bench tokenizer's specials first), LEARNED_PIECES pieces learned from the prose of the Python
    documentation (`pydoc_data`, in the standard library), then user-defined `<unused{i}>` symbols."""
    from pydoc_data.topics import topics

    import sentencepiece

    with open(path, "wb") as model:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter("\n".join(topics.values()).splitlines()), model_writer=model,
            vocab_size=vocab_size, model_type="bpe", pad_id=0, bos_id=1, eos_id=2, unk_id=3, minloglevel=2,
            user_defined_symbols=[f"<unused{i}>" for i in range(vocab_size - 4 - LEARNED_PIECES)])


#: convert_hf_to_gguf.py with every family's vocabulary read from the trained tokenizer.model: Gemma's and Llama's
#: converters read it already; the default (BLOOM's) hashes tokenizer.json's pre-tokenizer and rejects one it does
#: not know, as it does the bench tokenizer. argv: source tree, then the converter's own arguments.
CONVERT = """
import runpy, sys
source = sys.argv.pop(1)
sys.path[:0] = [source, source + "/gguf-py"]
from conversion.base import TextModel
TextModel.set_vocab = TextModel._set_vocab_sentencepiece
runpy.run_path(source + "/convert_hf_to_gguf.py", run_name="__main__")
"""
PRECISIONS = ("bf16", "q8_0", "q4_0")


def gguf(checkpoint: Path, precision: str, binaries: Path, version: str = VERSION) -> Path:
    """The GGUF of `checkpoint` at `precision` (one of PRECISIONS), made once: bf16 by the vendored converter
    from a copy of the checkpoint (links, and a trained tokenizer.model), Q8_0/Q4_0 from it by `llama-quantize`."""
    directory = CACHE / f"{version}-gguf" / checkpoint.name
    converted = directory / "bf16.gguf"
    if not converted.exists():
        stage = directory / "hf"
        stage.mkdir(parents=True, exist_ok=True)
        for file in checkpoint.iterdir():
            if not (stage / file.name).exists():
                (stage / file.name).symlink_to(file.resolve())
        if not (stage / "tokenizer.model").exists():
            train_tokenizer(stage / "tokenizer.model", json.loads((checkpoint / "config.json").read_text())["vocab_size"])
        partial = directory / "bf16.partial.gguf"
        checked([sys.executable, "-c", CONVERT, str(source(version)), str(stage), "--outtype", "bf16", "--outfile",
                 str(partial)], f"convert_hf_to_gguf.py on {checkpoint}")
        partial.rename(converted)
    if precision == "bf16":
        return converted
    quantized = directory / f"{precision}.gguf"
    if not quantized.exists():
        partial = directory / f"{precision}.partial.gguf"
        checked([str(binaries / "llama-quantize"), str(converted), str(partial), precision.upper()],
                f"llama-quantize {converted} {precision.upper()}")
        partial.rename(quantized)
    return quantized


class Result(NamedTuple):
    """One llama-bench test: prompt tokens (prefill), generated tokens (decode) after `depth` tokens of context."""

    prompt: int
    gen: int
    depth: int
    tok_s: float
    model_bytes: int
    params: int


def parse(output: str) -> list[Result]:
    """The tests of llama-bench's `-o json` output."""
    return [Result(t["n_prompt"], t["n_gen"], t["n_depth"], t["avg_ts"], t["model_size"], t["model_n_params"])
            for t in json.loads(output)]


def bench_command(binaries: Path, model: Path, *, threads: int, repeat: int, prompts: Sequence[int] = (0,),
                  gen: int = 0, depths: Sequence[int] = (0,)) -> list[str]:
    """A llama-bench command line: every prompt length and `gen` tokens, each at every depth."""
    def joined(values: Sequence[int]) -> str:
        return ",".join(map(str, values))

    return [str(binaries / "llama-bench"), "-m", str(model), "-p", joined(prompts), "-n", str(gen), "-d",
            joined(depths), "-t", str(threads), "-r", str(repeat), "-o", "json"]


def run_bench(command: list[str]) -> tuple[list[Result], float]:
    """Run a llama-bench command: its tests and its peak RSS in MB."""
    with tempfile.TemporaryFile() as errors, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=errors) as bench:
        output = bench.stdout.read()
        _, status, usage = os.wait4(bench.pid, 0)
        bench.returncode = os.waitstatus_to_exitcode(status)
        if bench.returncode != 0:
            errors.seek(0)
            last = (errors.read().decode(errors="replace").strip() or "no output").splitlines()[-1]
            raise PolylmError(f"llama-bench on {command[2]} failed (exit {bench.returncode}): {last}")
    return parse(output.decode()), usage.ru_maxrss / 1024


class Measured(NamedTuple):
    """llama-bench's tokens/s: prefill by prompt length, decode by depth; its peak RSS; the GGUF's mean bytes per
    weight (mixed: llama-quantize keeps the embedding/head at a wider type)."""

    prefill: dict[int, float]
    decode: dict[int, float]
    peak_rss_mb: float
    bytes_per_weight: float


def measure(binaries: Path, model: Path, *, threads: int, repeat: int, prompts: Sequence[int], depths: Sequence[int],
            new_tokens: int) -> Measured:
    """Prefill of each prompt length (from empty context), and decode of `new_tokens` at each depth."""
    tests: list[Result] = []
    peak = 0.0
    commands = ([bench_command(binaries, model, threads=threads, repeat=repeat, prompts=prompts)] if prompts else []) + \
               ([bench_command(binaries, model, threads=threads, repeat=repeat, gen=new_tokens, depths=depths)]
                if depths else [])
    for command in commands:
        found, rss = run_bench(command)
        tests += found
        peak = max(peak, rss)
    return Measured({t.prompt: t.tok_s for t in tests if t.gen == 0 and t.depth == 0},
                    {t.depth: t.tok_s for t in tests if t.gen and t.prompt == 0}, peak,
                    tests[0].model_bytes / tests[0].params)


def numbers(text: str) -> list[int]:
    """A comma-separated list of token counts ("128,512,2048"); empty for ""."""
    return [int(part) for part in text.split(",") if part.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma-bench", choices=sorted(CONFIGS))
    parser.add_argument("--precision", default=",".join(PRECISIONS), help="comma-separated, of " + ", ".join(PRECISIONS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=numbers, default=[128, 512, 2048], metavar="N,N,...")
    parser.add_argument("--depths", type=numbers, default=[128, 1024, 2048], metavar="N,N,...")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3, help="llama-bench's repetitions (-r); it shows the mean")
    args = parser.parse_args()
    flags = cpu_flags()
    binaries, checkpoint = build(flags), build_checkpoint(args.model)
    print(f"### llama.cpp {VERSION} (llama-cpp-python's vendored source), {args.model}, {args.threads} threads\n\n"
          f"{isa_summary(flags)}; built with {built_with(flags)}; llama-bench -r {args.repeat}, tok/s\n")
    print("| precision | " + " | ".join([f"prefill {n}" for n in args.prompt_tokens] +
                                       [f"decode at {d}" for d in args.depths]) + " |")
    print("|---|" + "---|" * (len(args.prompt_tokens) + len(args.depths)))
    for precision in args.precision.split(","):
        found = measure(binaries, gguf(checkpoint, precision, binaries), threads=args.threads, repeat=args.repeat,
                        prompts=args.prompt_tokens, depths=args.depths, new_tokens=args.new_tokens)
        print(f"| {precision.upper()} | " + " | ".join([f"{found.prefill[n]:.0f}" for n in args.prompt_tokens] +
                                                     [f"{found.decode[d]:.1f}" for d in args.depths]) + " |")


if __name__ == "__main__":
    main()
