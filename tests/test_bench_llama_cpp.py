"""benchmarks/bench_llama_cpp.py and bench_cpu.py's tables, without building llama.cpp: cmake options from CPU
flags, the build's cache key, llama-bench's JSON (a recorded sample, and a stand-in binary that prints it)."""

import sys
from pathlib import Path

import pytest
import sentencepiece

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))

import bench_cpu  # noqa: E402
import bench_llama_cpp as llama_cpp  # noqa: E402

from polylm.errors import PolylmError  # noqa: E402

# Flags lines of /proc/cpuinfo, trimmed to what the choice reads and a few it ignores.
AVX2_ONLY = "flags\t\t: fpu sse4_2 avx f16c fma avx2 bmi2 sha_ni\n"
AVX512_VNNI = ("processor\t: 0\nflags\t\t: fpu sse4_2 avx f16c fma avx2 bmi2 avx512f avx512dq avx512cd avx512bw "
               "avx512vl avx512_vnni\nbugs\t\t: spectre_v1\n")
AMX = ("flags\t\t: sse4_2 avx f16c fma avx2 bmi2 avx_vnni avx512f avx512dq avx512cd avx512bw avx512vl avx512vbmi "
       "avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8\n")
BASE = ["-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DGGML_NATIVE=OFF", "-DLLAMA_OPENSSL=OFF",
        "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF"]
AMX_OFF = ["-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"]


def test_cpu_flags_read_the_first_flags_line():
    assert llama_cpp.cpu_flags(AVX512_VNNI) == {"fpu", "sse4_2", "avx", "f16c", "fma", "avx2", "bmi2", "avx512f",
                                                "avx512dq", "avx512cd", "avx512bw", "avx512vl", "avx512_vnni"}
    assert llama_cpp.cpu_flags("processor\t: 0\n") == frozenset()


@pytest.mark.parametrize("cpuinfo,on", [
    (AVX2_ONLY, ["SSE42", "AVX", "AVX2", "FMA", "F16C", "BMI2"]),
    (AVX512_VNNI, ["SSE42", "AVX", "AVX2", "FMA", "F16C", "BMI2", "AVX512", "AVX512_VNNI"]),
    (AMX, ["SSE42", "AVX", "AVX2", "FMA", "F16C", "BMI2", "AVX_VNNI", "AVX512", "AVX512_VBMI", "AVX512_VNNI",
           "AVX512_BF16"]),
])
def test_cmake_options_name_every_isa_option_and_keep_amx_off(cpuinfo, on):
    isa = ["SSE42", "AVX", "AVX2", "FMA", "F16C", "BMI2", "AVX_VNNI", "AVX512", "AVX512_VBMI", "AVX512_VNNI",
           "AVX512_BF16"]
    expected = BASE + [f"-DGGML_{name}={'ON' if name in on else 'OFF'}" for name in isa] + AMX_OFF
    assert llama_cpp.cmake_options(llama_cpp.cpu_flags(cpuinfo)) == expected


def test_avx512_needs_all_five_foundation_flags():
    flags = llama_cpp.cpu_flags(AVX512_VNNI) - {"avx512bw"}
    assert llama_cpp.isa_options(flags)["GGML_AVX512"] is False
    assert llama_cpp.isa_options(flags)["GGML_AVX512_VNNI"] is True


def test_cache_key_is_the_version_and_a_hash_of_the_options():
    options = llama_cpp.cmake_options(llama_cpp.cpu_flags(AVX512_VNNI))
    assert llama_cpp.cache_key("0.3.36", options) == "0.3.36-202822f55b0c"
    assert llama_cpp.cache_key("0.3.36", llama_cpp.cmake_options(llama_cpp.cpu_flags(AVX2_ONLY))) != \
        "0.3.36-202822f55b0c"
    assert llama_cpp.cache_key("0.3.37", options) == "0.3.37-202822f55b0c"


def test_captions_name_the_isa_and_the_build():
    assert llama_cpp.isa_summary(llama_cpp.cpu_flags(AMX)) == \
        "AVX2 yes, AVX-512 yes, AVX-512 VNNI yes, AVX-512 BF16 yes, AMX yes"
    assert llama_cpp.isa_summary(llama_cpp.cpu_flags(AVX2_ONLY)) == \
        "AVX2 yes, AVX-512 no, AVX-512 VNNI no, AVX-512 BF16 no, AMX no"
    assert llama_cpp.built_with(llama_cpp.cpu_flags(AVX2_ONLY)) == \
        "GGML_SSE42 GGML_AVX GGML_AVX2 GGML_FMA GGML_F16C GGML_BMI2 (GGML_NATIVE and AMX off)"
    assert [llama_cpp.label(p) for p in llama_cpp.PRECISIONS] == ["llama.cpp bf16", "llama.cpp Q8_0", "llama.cpp Q4_0"]


def test_bench_command():
    command = llama_cpp.bench_command(Path("/b"), Path("/m.gguf"), threads=2, repeat=1, gen=64, depths=[128, 2048])
    assert command == ["/b/llama-bench", "-m", "/m.gguf", "-p", "0", "-n", "64", "-d", "128,2048", "-t", "2", "-r",
                       "1", "-o", "json"]


def test_length_table_shows_ratios_to_transformers_and_the_llama_cpp_peer():
    rows = {("transformers bf16", 128): {"prefill_tok_s": 1000.0}, ("transformers bf16", 512): {"prefill_tok_s": 2000.0},
            ("polylm int8", 128): {"prefill_tok_s": 500.0}, ("polylm int8", 512): {"prefill_tok_s": 600.0},
            ("llama.cpp Q8_0", 128): {"prefill_tok_s": 400.0}, ("llama.cpp Q8_0", 512): {"error": "llama-bench failed"},
            ("polylm fp32 compute", 128): {"prefill_tok_s": 250.0}, ("polylm fp32 compute", 512): {"prefill_tok_s": None}}
    lines = bench_cpu.length_table(rows, ["transformers bf16", "polylm int8", "llama.cpp Q8_0", "polylm fp32 compute"],
                                   [128, 512], "prefill_tok_s", "prompt", ".0f")
    assert lines == ["| engine | prompt 128 | prompt 512 | 512 / 128 |", "|---|---|---|---|",
                     "| transformers bf16 | 1000 | 2000 | 200% |",
                     "| polylm int8 | 500 (0.50×, 1.25×) | 600 (0.30×, —) | 120% |",
                     "| llama.cpp Q8_0 | 400 (0.40×) | llama-bench failed |  |",
                     "| polylm fp32 compute | 250 (0.25×) | — |  |"]


#: llama-bench -m GGUF -p 16 -n 4 -d 0,32 -t 2 -r 1 -o json, on gemma-bench's Q4_0 (a recorded run).
SAMPLE = Path(__file__).parent / "data" / "llama_bench.json"
Q4_0 = dict(model_bytes=126957568, params=210527232)


def test_parse_reads_each_test_of_a_recorded_run():
    assert llama_cpp.parse(SAMPLE.read_text()) == [
        llama_cpp.Result(16, 0, 0, 51.082629, **Q4_0), llama_cpp.Result(0, 4, 0, 14.412032, **Q4_0),
        llama_cpp.Result(16, 0, 32, 42.830924, **Q4_0), llama_cpp.Result(0, 4, 32, 15.700831, **Q4_0)]


def stand_in(tmp_path: Path, body: str) -> Path:
    """A directory with a `llama-bench` shell script that logs its arguments and runs `body`."""
    script = tmp_path / "llama-bench"
    script.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "calls"}\n{body}\n')
    script.chmod(0o755)
    return tmp_path


def test_measure_runs_prefill_and_decode_apart_and_keeps_their_own_tests(tmp_path):
    binaries = stand_in(tmp_path, f"cat {SAMPLE}")
    found = llama_cpp.measure(binaries, Path("/m.gguf"), threads=2, repeat=1, prompts=[16], depths=[32],
                              new_tokens=4)
    assert (found.prefill, found.decode) == ({16: 51.082629}, {0: 14.412032, 32: 15.700831})
    assert found.bytes_per_weight == 126957568 / 210527232
    assert found.peak_rss_mb > 0
    assert (tmp_path / "calls").read_text().splitlines() == [
        "-m /m.gguf -p 16 -n 0 -d 0 -t 2 -r 1 -o json", "-m /m.gguf -p 0 -n 4 -d 32 -t 2 -r 1 -o json"]


def test_a_failed_llama_bench_names_the_model_and_its_last_words(tmp_path):
    binaries = stand_in(tmp_path, "echo 'loading' >&2; echo 'error: failed to load model' >&2; exit 3")
    with pytest.raises(PolylmError, match=r"^llama-bench on /m.gguf failed \(exit 3\): error: failed to load model$"):
        llama_cpp.measure(binaries, Path("/m.gguf"), threads=2, repeat=1, prompts=[16], depths=[], new_tokens=4)


def test_trained_tokenizer_has_exactly_the_embedding_rows_and_the_bench_specials(tmp_path):
    llama_cpp.train_tokenizer(tmp_path / "tokenizer.model", 32000)
    model = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    assert model.vocab_size() == 32000
    assert [model.IdToPiece(i) for i in (0, 1, 2, 3, 4, 23995)] == ["<pad>", "<s>", "</s>", "<unk>", "<unused0>",
                                                                    "<unused23991>"]
    learned = [i for i in range(32000) if not model.IsControl(i) and not model.IsUnknown(i)
               and not model.IdToPiece(i).startswith("<unused")]
    assert len(learned) == llama_cpp.LEARNED_PIECES == 8000
