"""Every bad input gets a typed error naming where and what — in the library and the CLI — and nothing
in the model directory is ever written."""

import io
import json
import os
import shutil
import struct
import sys
from pathlib import Path

import pytest

import polylm
from polylm.backend import Availability, Backend
from polylm.cli import main
from polylm.errors import (BackendError, ConfigError, InputError, IRError, TaskError, TemplateError,
                           TokenizerError, WeightsError)
from polylm.generate import sandbox
from polylm.loading.registry import PluginInfo, registry

# -- mutations of a valid checkpoint ------------------------------------------------------------------------


def edit_config(**changes):
    def mutate(directory: Path):
        path = directory / "config.json"
        config = json.loads(path.read_text())
        for key, value in changes.items():
            if value is DELETE:
                config.pop(key, None)
            else:
                config[key] = value
        path.write_text(json.dumps(config))
    return mutate


DELETE = object()


def write_file(name, content):
    def mutate(directory: Path):
        (directory / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return mutate


def delete_file(name):
    def mutate(directory: Path):
        (directory / name).unlink()
    return mutate


def read_safetensors(path: Path):
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + length]), raw[8 + length:]


def write_safetensors(path: Path, header, data: bytes):
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def edit_header(change):
    def mutate(directory: Path):
        path = directory / "model.safetensors"
        header, data = read_safetensors(path)
        data = change(header, data)
        write_safetensors(path, header, data if data is not None else read_safetensors(path)[1])
    return mutate


def first_vector(header):
    return next(k for k, v in header.items() if k != "__metadata__" and len(v["shape"]) == 1)


def truncate_to(size):
    def mutate(directory: Path):
        path = directory / "model.safetensors"
        path.write_bytes(path.read_bytes()[:size])
    return mutate


def header_length(value):
    def mutate(directory: Path):
        path = directory / "model.safetensors"
        raw = path.read_bytes()
        path.write_bytes(struct.pack("<Q", value) + raw[8:])
    return mutate


def shard_index(weight_map_file):
    def mutate(directory: Path):
        header, _ = read_safetensors(directory / "model.safetensors")
        names = [k for k in header if k != "__metadata__"]
        weight_map = {name: "model.safetensors" for name in names}
        weight_map[names[0]] = weight_map_file
        (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return mutate


def only_pickle(directory: Path):
    (directory / "model.safetensors").unlink()
    (directory / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")


def overlap(header, data):
    names = [k for k in header if k != "__metadata__"]
    header[names[1]]["data_offsets"] = list(header[names[0]]["data_offsets"])
    header[names[1]]["shape"], header[names[1]]["dtype"] = header[names[0]]["shape"], header[names[0]]["dtype"]


def out_of_range(header, data):
    name = first_vector(header)
    begin, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [len(data) - 8, len(data) - 8 + (end - begin)]


def dtype_to(value):
    def change(header, data):
        header[first_vector(header)]["dtype"] = value
    return change


def reshape_vector(header, data):
    name = first_vector(header)
    (size,) = header[name]["shape"]
    header[name]["shape"] = [size // 2, 2]


def drop_tensor(header, data):
    del header[first_vector(header)]


def add_tensor(header, data):
    header["model.layers.0.mystery.weight"] = {"dtype": "F32", "shape": [4], "data_offsets": [len(data), len(data) + 16]}
    return data + bytes(16)


def fifo(name):
    def mutate(directory: Path):
        (directory / name).unlink(missing_ok=True)
        os.mkfifo(directory / name)
    return mutate


def link_to(name, target):
    def mutate(directory: Path):
        (directory / name).unlink(missing_ok=True)
        (directory / name).symlink_to(target)
    return mutate


def sparse(name, size):
    def mutate(directory: Path):
        with open(directory / name, "wb") as fh:
            fh.write(b"{")
            fh.truncate(size)
    return mutate


DEEP = "[" * 100_000 + "]" * 100_000


def raw_config_value(key, text):
    """config.json with `key` set to the raw JSON `text` (e.g. a number json.dumps cannot write)."""
    def mutate(directory: Path):
        path = directory / "config.json"
        config = json.loads(path.read_text())
        config[key] = "@@"
        path.write_text(json.dumps(config).replace('"@@"', text))
    return mutate


def deep_header(directory: Path):
    blob = DEEP.encode()
    (directory / "model.safetensors").write_bytes(struct.pack("<Q", len(blob)) + blob)


def duplicate_tensor(directory: Path):
    path = directory / "model.safetensors"
    header, data = read_safetensors(path)
    name = first_vector(header)
    blob = ("{" + json.dumps(name) + ": " + json.dumps(header[name]) + ", " + json.dumps(header)[1:]).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


NAN_BYTES = {"F32": b"\x00\x00\xc0\x7f", "BF16": b"\xc0\x7f", "F16": b"\x00\x7e"}


def nan_in_vector(header, data):
    name = first_vector(header)
    begin = header[name]["data_offsets"][0]
    nan = NAN_BYTES[header[name]["dtype"]]
    return data[:begin] + nan + data[begin + len(nan):]


def rope(**parameters):
    return edit_config(rope_parameters={"rope_theta": 10000.0, **parameters}, rope_scaling=DELETE)


def yarn(**parameters):
    return rope(**{"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64, **parameters})


def llama3(**parameters):
    return rope(**{"rope_type": "llama3", "factor": 2.0, "original_max_position_embeddings": 64, **parameters})


def generate(prompt=..., **options):
    return lambda m: m.generate("hi" if prompt is ... else prompt, max_new_tokens=2, **options)


NOOP = None
LOAD = "load"

# id: (mutation, action, expected class, words in the message). Actions: "load" or a callable(model).
CASES = {
    "config-missing": (delete_file("config.json"), LOAD, ConfigError, ["config.json", "not found"]),
    "config-not-json": (write_file("config.json", "{'model_type': gemma"), LOAD, ConfigError, ["not valid JSON"]),
    "config-not-object": (write_file("config.json", "[1, 2, 3]"), LOAD, ConfigError, ["JSON object", "list"]),
    "config-wrong-type": (edit_config(hidden_size="64"), LOAD, ConfigError, ["'hidden_size'", "integer", "'64'"]),
    "config-zero-size": (edit_config(num_attention_heads=0), LOAD, ConfigError, ["num_attention_heads", "positive"]),
    "config-negative-size": (edit_config(intermediate_size=-8), LOAD, ConfigError, ["intermediate_size", "-8"]),
    "config-unknown-model-type": (edit_config(model_type="llama9"), LOAD, ConfigError,
                                  ["unknown model_type 'llama9'", "helium"]),
    "config-no-model-type": (edit_config(model_type=DELETE), LOAD, ConfigError, ["missing key 'model_type'"]),
    "config-unknown-activation": (edit_config(hidden_act="swiglu9"), LOAD, ConfigError,
                                  ["unsupported activation 'swiglu9'", "hidden_act"]),
    "config-unknown-rope-type": (edit_config(rope_parameters={"rope_type": "spiral", "rope_theta": 1e4}), LOAD,
                                 ConfigError, ["unsupported rope type 'spiral'"]),
    "config-kv-heads-not-dividing": (edit_config(num_key_value_heads=3), LOAD, IRError,
                                     ["num_attention_heads (4)", "num_key_value_heads (3)"]),
    "config-odd-rotary-dims": (edit_config(rope_parameters={"rope_theta": 1e4, "partial_rotary_factor": 0.5625}),
                               LOAD, IRError, ["rotary dims", "even"]),
    "config-billion-layers": (edit_config(num_hidden_layers=10**9), LOAD, IRError,
                              ["num_hidden_layers must be at most 65536, got 1000000000"]),
    "config-more-layers-than-tensors": (edit_config(num_hidden_layers=4000), LOAD, WeightsError,
                                        ["declares 4000 layers"]),
    "config-nan-eps": (edit_config(rms_norm_eps=float("nan")), LOAD, ConfigError, ["rms_norm_eps", "nan"]),
    "weights-none": (delete_file("model.safetensors"), LOAD, WeightsError, ["no model.safetensors"]),
    "weights-tiny-file": (truncate_to(5), LOAD, WeightsError, ["truncated"]),
    "weights-truncated-data": (truncate_to(4000), LOAD, WeightsError, ["model.safetensors", "outside the data"]),
    "weights-header-past-end": (header_length(10**12), LOAD, WeightsError, ["runs past the end"]),
    "weights-header-not-json": (write_file("model.safetensors", struct.pack("<Q", 6) + b"{oops}" + b"\0" * 16),
                                LOAD, WeightsError, ["header is not valid JSON"]),
    "weights-overlapping": (edit_header(overlap), LOAD, WeightsError, ["overlap"]),
    "weights-out-of-range": (edit_header(out_of_range), LOAD, WeightsError, ["outside the data section"]),
    "weights-unknown-dtype": (edit_header(dtype_to("Q3")), LOAD, WeightsError, ["unknown dtype 'Q3'"]),
    "weights-unsupported-dtype": (edit_header(dtype_to("I32")), LOAD, WeightsError, ["dtype I32", "expected F32"]),
    "weights-missing-tensor": (edit_header(drop_tensor), LOAD, WeightsError, ["missing tensor", "expected shape"]),
    "weights-unexpected-tensor": (edit_header(add_tensor), LOAD, WeightsError,
                                  ["unexpected tensor 'model.layers.0.mystery.weight'"]),
    "weights-misshaped": (edit_header(reshape_vector), LOAD, WeightsError, ["has shape [32, 2], expected [64]"]),
    "index-missing-shard": (shard_index("model-00002-of-00002.safetensors"), LOAD, WeightsError,
                            ["model-00002-of-00002.safetensors", "does not exist"]),
    "index-escapes-directory": (shard_index("../../etc/passwd"), LOAD, WeightsError, ["outside the model directory"]),
    "index-absolute-path": (shard_index("/etc/passwd"), LOAD, WeightsError, ["absolute"]),
    "index-not-a-map": (write_file("model.safetensors.index.json", '{"weight_map": [1]}'), LOAD, WeightsError,
                        ["weight_map"]),
    "only-pickle": (only_pickle, LOAD, WeightsError, ["pytorch_model.bin", "never unpickles", "save_pretrained"]),
    "tokenizer-corrupt": (write_file("tokenizer.json", "{\"version\": 1, \"model\": 3}"), LOAD, TokenizerError,
                          ["tokenizer.json", "cannot load tokenizer"]),
    "tokenizer-missing": (delete_file("tokenizer.json"), lambda m: m.generate("hi", max_new_tokens=2),
                          TokenizerError, ["no tokenizer.json"]),
    "tokenizer-bad-eos": (write_file("generation_config.json", '{"eos_token_id": "two"}'), LOAD, TokenizerError,
                          ["generation_config.json", "eos_token_id"]),
    "token-out-of-vocab": (NOOP, lambda m: m.forward([[1, 5, 99999]]), InputError,
                           ["token id 99999", "outside the vocabulary"]),
    "negative-token": (NOOP, lambda m: m.generate([1, -4], max_new_tokens=2), InputError, ["token id -4"]),
    "empty-prompt": (NOOP, lambda m: m.generate("", max_new_tokens=2), InputError, ["prompt is empty"]),
    "prompt-too-long": (NOOP, lambda m: m.generate([1] * 300, max_new_tokens=2), InputError,
                        ["300 tokens", "context of 256"]),
    "negative-temperature": (NOOP, lambda m: m.generate("hi", temperature=-0.5), InputError, ["temperature"]),
    "top-p-zero": (NOOP, lambda m: m.generate("hi", top_p=0.0), InputError, ["top_p must be in (0, 1]"]),
    "top-p-above-one": (NOOP, lambda m: m.generate("hi", top_p=1.01), InputError, ["top_p"]),
    "top-k-negative": (NOOP, lambda m: m.generate("hi", top_k=-1), InputError, ["top_k"]),
    "max-new-tokens-negative": (NOOP, lambda m: m.generate("hi", max_new_tokens=-3), InputError,
                                ["max_new_tokens"]),
    "ragged-batch": (NOOP, lambda m: m.forward([[1, 2], [3]]), InputError, ["rectangular"]),
    "mask-shape": (NOOP, lambda m: m.forward([[1, 2]], attention_mask=[[1, 1, 1]]), InputError,
                   ["attention_mask shape"]),
    "unknown-backend": (NOOP, "backend:quantum", BackendError, ["unknown backend 'quantum'", "torch"]),
    "unavailable-backend": (NOOP, "backend:offline-stub", BackendError,
                            ["not available here", "stub hardware missing", "pip install stub"]),
    "unsupported-dtype": (NOOP, "dtype:bfloat16@fp32-stub", BackendError, ["cannot compute in bfloat16"]),
    "unknown-dtype": (NOOP, "dtype:float8@torch", BackendError, ["unknown dtype 'float8'"]),
    "no-head-for-task": (NOOP, "task:question-answering", TaskError, ["'qa_outputs'", "head"]),
    "unknown-task": (NOOP, "task:summarize", TaskError, ["unknown task 'summarize'"]),
    # files that are not regular files, or too large, or JSON no parser should take
    "config-fifo": (fifo("config.json"), LOAD, ConfigError, ["config.json", "named pipe"]),
    "config-dev-zero": (link_to("config.json", "/dev/zero"), LOAD, ConfigError, ["config.json", "character device"]),
    "config-directory": (lambda d: ((d / "config.json").unlink(), (d / "config.json").mkdir()), LOAD, ConfigError,
                         ["config.json", "a directory"]),
    "config-too-large": (sparse("config.json", 40 * 2**20), LOAD, ConfigError, ["config.json", "larger than"]),
    "config-deeply-nested": (write_file("config.json", DEEP), LOAD, ConfigError, ["config.json", "nested too deeply"]),
    "config-5000-digit-int": (raw_config_value("hidden_size", "9" * 5000), LOAD, ConfigError,
                              ["config.json", "too many digits"]),
    "config-not-utf8": (write_file("config.json", b'{"model_type": "\xff"}'), LOAD, ConfigError,
                        ["config.json", "not UTF-8"]),
    "weights-fifo": (fifo("model.safetensors"), LOAD, WeightsError, ["model.safetensors", "named pipe"]),
    "weights-dev-zero": (link_to("model.safetensors", "/dev/zero"), LOAD, WeightsError,
                         ["model.safetensors", "character device"]),
    "weights-header-deeply-nested": (deep_header, LOAD, WeightsError, ["model.safetensors", "nested too deeply"]),
    "weights-duplicate-tensor": (duplicate_tensor, LOAD, WeightsError, ["appears more than once"]),
    "weights-nan-norm": (edit_header(nan_in_vector), LOAD, WeightsError, ["NaN or infinity at index 0"]),
    "index-deeply-nested": (write_file("model.safetensors.index.json", DEEP), LOAD, WeightsError,
                            ["model.safetensors.index.json", "nested too deeply"]),
    "index-fifo": (fifo("model.safetensors.index.json"), LOAD, WeightsError, ["index.json", "named pipe"]),
    "tokenizer-fifo": (fifo("tokenizer.json"), LOAD, TokenizerError, ["tokenizer.json", "named pipe"]),
    "tokenizer-config-fifo": (fifo("tokenizer_config.json"), LOAD, TokenizerError,
                              ["tokenizer_config.json", "named pipe"]),
    "tokenizer-config-deeply-nested": (write_file("tokenizer_config.json", DEEP), LOAD, TokenizerError,
                                       ["tokenizer_config.json", "nested too deeply"]),
    "tokenizer-config-too-large": (sparse("tokenizer_config.json", 40 * 2**20), LOAD, TokenizerError,
                                   ["tokenizer_config.json", "larger than"]),
    "generation-config-dev-zero": (link_to("generation_config.json", "/dev/zero"), LOAD, ConfigError,
                                   ["generation_config.json", "character device"]),
    # RoPE parameters that would divide by zero or leave the math domain at the first forward pass
    "rope-theta-zero": (rope(rope_theta=0.0), LOAD, IRError, ["config.json", "rope_theta must be a number > 1"]),
    "rope-yarn-theta-one": (yarn(rope_theta=1.0), LOAD, IRError, ["config.json", "rope_theta", "> 1"]),
    "rope-yarn-beta-fast-zero": (yarn(beta_fast=0.0), LOAD, IRError, ["config.json", "beta_fast must be"]),
    "rope-yarn-beta-fast-negative": (yarn(beta_fast=-1.0), LOAD, IRError, ["beta_fast must be", "-1.0"]),
    "rope-yarn-beta-slow-zero": (yarn(beta_slow=0.0), LOAD, IRError, ["beta_slow must be"]),
    "rope-yarn-mscale-zeroing": (yarn(factor=4.0, mscale=1.0, mscale_all_dim=-10 / 1.3862943611198906), LOAD,
                                 IRError, ["mscale_all_dim must be a number ≥ 0"]),
    "rope-yarn-attention-factor-zero": (yarn(attention_factor=0.0), LOAD, IRError, ["attention_factor"]),
    "rope-llama3-low-freq-zero": (llama3(low_freq_factor=0.0), LOAD, IRError, ["low_freq_factor must be"]),
    "rope-llama3-high-freq-zero": (llama3(high_freq_factor=0.0), LOAD, IRError, ["high_freq_factor must be"]),
    "rope-factor-below-one": (rope(rope_type="linear", factor=1e-300), LOAD, IRError, ["factor must be"]),
    "rope-scaling-conflict": (edit_config(rope_scaling={"type": "linear", "factor": 2.0},
                                          rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 1e4}),
                              LOAD, ConfigError, ["'factor' is 2.0 in 'rope_scaling' but 4.0 in 'rope_parameters'"]),
    # library calls with arguments of the wrong kind
    "prompt-fills-context": (NOOP, generate([1] * 256), InputError,
                             ["256 tokens fills the model's context of 256"]),
    "stop-int": (NOOP, generate(stop=5), InputError, ["stop must be a string or a list of strings"]),
    "stop-list-of-int": (NOOP, generate(stop=[5]), InputError, ["stop must be"]),
    "prompt-none": (NOOP, generate(None), InputError, ["a prompt must be", "NoneType"]),
    "prompt-int": (NOOP, generate(5), InputError, ["a prompt must be", "int 5"]),
    "prompt-floats": (NOOP, generate([1.0]), InputError, ["a prompt must be", "float"]),
    "prompt-mixed-batch": (NOOP, generate(["a", 1]), InputError, ["a prompt must be", "int 1"]),
    "prompt-list-of-none": (NOOP, generate([None]), InputError, ["a prompt must be"]),
    "prompt-lone-surrogate": (NOOP, generate("\ud800"), InputError, ["unpaired surrogate"]),
    "prompt-too-many-characters": (NOOP, generate("ab" * 2_500_000), InputError, ["5,000,000 characters"]),
    "stream-not-bool": (NOOP, generate(stream="yes"), InputError, ["stream must be True or False"]),
    "classify-int": (NOOP, lambda m: m.classify(5), InputError, ["classify takes a string or a list of strings"]),
    "chat-template-int": (NOOP, lambda m: m.chat([{"role": "user", "content": "hi"}], template=5), InputError,
                          ["template must be the template's text or a path"]),
}


class _StubBackend(Backend):
    def __init__(self, name, available, dtypes=("float32",)):
        self.name, self._available, self.dtypes = name, available, dtypes
        self.install_hint = "pip install stub"
        self.priority = -100

    def availability(self):
        # the unavailable stub's framework is not installed, so the error carries its install hint
        return Availability(self._available, "ready" if self._available else "stub hardware missing",
                            installed=self._available)

    def lower(self, ir, weights, dtype):
        raise AssertionError("never reached")


@pytest.fixture(autouse=True)
def stub_backends(monkeypatch):
    backends = dict(registry().backends)
    info = PluginInfo("stub", "tests", "0")
    backends["offline-stub"] = (_StubBackend("offline-stub", False), info)
    backends["fp32-stub"] = (_StubBackend("fp32-stub", True), info)
    monkeypatch.setattr(registry(), "backends", backends)


def snapshot(directory: Path):
    return sorted((str(p.relative_to(directory)), p.stat().st_size, p.stat().st_mtime_ns)
                  for p in directory.rglob("*"))


def prepared(make_ckpt, tmp_path, mutation):
    directory = tmp_path / "model"
    shutil.copytree(make_ckpt("helium"), directory)
    if mutation is not None:
        mutation(directory)
    return directory


def run_library(directory, action):
    options = {"backend": "torch"}
    if isinstance(action, str) and ":" in action:
        kind, value = action.split(":", 1)
        if kind == "dtype":
            options["dtype"], options["backend"] = value.split("@")
        else:
            options[kind] = value
        return polylm.load(directory, **options)
    model = polylm.load(directory, **options)
    return action(model) if callable(action) else model


@pytest.mark.parametrize("case", CASES)
def test_library_raises_typed_error(make_ckpt, tmp_path, case):
    mutation, action, expected, words = CASES[case]
    directory = prepared(make_ckpt, tmp_path, mutation)
    before = snapshot(directory)
    with pytest.raises(expected) as caught:
        result = run_library(directory, action)
        if hasattr(result, "__next__"):
            list(result)
    for word in words:
        assert word in str(caught.value)
    assert isinstance(caught.value, polylm.PolylmError)
    assert snapshot(directory) == before


def cli_args(directory, action):
    argv = ["run", "--model", str(directory), "--max-new-tokens", "2"]
    if isinstance(action, str) and ":" in action:
        kind, value = action.split(":", 1)
        if kind == "task":
            return None
        if kind == "dtype":
            dtype, backend = value.split("@")
            return argv + ["--dtype", dtype, "--backend", backend, "hi"]
        return argv + [f"--{kind}", value, "hi"]
    return argv + ["--backend", "torch", "hi"]


CLI_CASES = [c for c, (m, a, _, _) in CASES.items() if a == LOAD or (isinstance(a, str) and not a.startswith("task"))]
CLI_CASES += ["tokenizer-missing"]


@pytest.mark.parametrize("case", CLI_CASES)
def test_cli_exits_2_with_one_line(make_ckpt, tmp_path, capsys, case):
    mutation, action, _, words = CASES[case]
    directory = prepared(make_ckpt, tmp_path, mutation)
    before = snapshot(directory)
    capsys.readouterr()
    assert main(cli_args(directory, action)) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and captured.err.startswith("polylm: error: ")
    assert "Traceback" not in captured.err
    assert words[0] in captured.err
    assert snapshot(directory) == before


@pytest.mark.parametrize("args,words", [
    (["--temperature", "-1"], ["temperature"]),
    (["--top-p", "0"], ["top_p"]),
    (["--top-k", "-2"], ["top_k"]),
    (["--max-new-tokens", "-1"], ["max_new_tokens"]),
])
def test_cli_bad_sampling_flags(make_ckpt, capsys, args, words):
    directory = make_ckpt("helium")
    capsys.readouterr()
    assert main(["run", "--model", str(directory), *args, "hi"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and all(w in err for w in words)


def test_cli_bug_keeps_traceback_and_exits_1(monkeypatch, make_ckpt):
    import subprocess
    import sys

    code = ("import polylm.cli, polylm.loading\n"
            "def boom(*a, **k): raise RuntimeError('a real bug')\n"
            "polylm.loading.load = boom\n"
            f"raise SystemExit(polylm.cli.main(['run', '--model', {str(make_ckpt('helium'))!r}, 'hi']))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" in result.stderr and "a real bug" in result.stderr


def test_cli_ctrl_c_exits_130(monkeypatch, capsys):
    import polylm.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_families", interrupted)
    assert cli.main(["families"]) == 130
    assert "Traceback" not in capsys.readouterr().err


def test_case_count():
    assert len(CASES) >= 90 and len(TEMPLATE_CASES) >= 20


def test_hub_cache_symlinks_to_blobs_load(make_ckpt, tmp_path):
    """The Hugging Face cache links every file of a snapshot to its blob: links to regular files are read."""
    blobs, snapshot_dir = tmp_path / "blobs", tmp_path / "snapshots" / "abc"
    shutil.copytree(make_ckpt("helium"), blobs)
    snapshot_dir.mkdir(parents=True)
    for blob in blobs.iterdir():
        (snapshot_dir / blob.name).symlink_to(os.path.relpath(blob, snapshot_dir))
    model = polylm.load(snapshot_dir, backend="torch")
    assert model.generate([1, 2, 3], max_new_tokens=3) == polylm.load(blobs, backend="torch").generate(
        [1, 2, 3], max_new_tokens=3)


def test_rope_parameters_agreeing_with_rope_scaling_load(make_ckpt, tmp_path):
    same = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    directory = prepared(make_ckpt, tmp_path, edit_config(rope_parameters=same, rope_scaling={
        "type": "linear", "factor": 2.0}))
    assert polylm.load(directory, backend="torch").ir.attention.position.scaling.factor == 2.0


# -- chat templates: whatever a template holds, a TemplateError (or InputError) naming it, within bounds ------

TEMPLATE_CASES = {
    "nested-range-loops": ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
                           TemplateError, ["chat_template.jinja", "ran for more than 0.5 s"]),
    "output-too-long": ("{% for i in range(100000) %}{{ 'x' * 100000 }}{% endfor %}", TemplateError,
                        ["writes more than 4,000,000 characters"]),
    "repeat-300M": ("{{ 'x' * 300000000 }}", TemplateError, ["repeats 1 items 300,000,000 times"]),
    "repeat-1e12": ("{{ 'x' * 10**12 }}", TemplateError, ["repeats"]),
    "include": ("{% include 'other.jinja' %}", TemplateError, ["chat_template.jinja", "TypeError"]),
    "range-1e9": ("{% for i in range(10**9) %}{% endfor %}", TemplateError, ["passes 1,000,000,000"]),
    "range-past-jinja-cap": ("{% for i in range(200000) %}{% endfor %}", TemplateError, ["OverflowError",
                                                                                         "MAX_RANGE"]),
    "recursive-macro": ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", TemplateError,
                        ["RecursionError"]),
    "divide-by-zero": ("{{ 1 / 0 }}", TemplateError, ["ZeroDivisionError"]),
    "concat-doubling": (("{% set ns = namespace(s='x' * 100000) %}{% for i in range(40) %}"
                         "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}"), TemplateError, ["builds a value"]),
    "list-doubling": (("{% set ns = namespace(s=[1] * 100000) %}{% for i in range(40) %}"
                       "{% set ns.s = ns.s + ns.s %}{% endfor %}"), TemplateError, ["builds a value"]),
    "huge-power": ("{{ 10 ** (10 ** 8) }}", TemplateError, ["more than 4096 bits"]),
    "huge-width": ("{{ 'x'|center(1000000000) }}", TemplateError, ["passes 1,000,000,000"]),
    "huge-method-width": ("{{ 'x'.ljust(1000000000) }}", TemplateError, ["passes 1,000,000,000"]),
    "syntax-error": ("{% for %}", TemplateError, ["chat_template.jinja", "does not compile"]),
    "unsafe-attribute": ("{{ messages.__class__.__mro__ }}", TemplateError, ["failed"]),
    "refuses-messages": ("{{ raise_exception('only user turns') }}", InputError, ["chat_template.jinja",
                                                                                 "only user turns"]),
    "not-utf8": (b"\xff\xfe{{ messages }}", TemplateError, ["chat_template.jinja", "not UTF-8"]),
    "file-too-large": (sparse("chat_template.jinja", 50 * 2**20), TemplateError, ["chat_template.jinja",
                                                                                  "larger than"]),
    "fifo": (fifo("chat_template.jinja"), TemplateError, ["chat_template.jinja", "named pipe"]),
    "json-list": (write_file("chat_template.json", "[1, 2]"), TemplateError, ["chat_template.json", "list"]),
    "json-not-json": (write_file("chat_template.json", "{chat"), TemplateError, ["chat_template.json",
                                                                                 "not valid JSON"]),
    "source-too-long": (lambda d: edit_tokenizer_config(d, chat_template="x" * 70_000), TemplateError,
                        ["tokenizer_config.json: key 'chat_template'", "70,000 characters is longer than"]),
    "big-number-through-filters": ("{{ 10000000|string }}{{ [10000000]|join(',') }}{{ raise_exception('ok') }}",
                                   InputError, ["ok"]),
    "settings-number": (lambda d: edit_tokenizer_config(d, chat_template=5), TemplateError,
                        ["tokenizer_config.json: key 'chat_template'", "int"]),
}


def edit_tokenizer_config(directory: Path, **changes):
    path = directory / "tokenizer_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def template_directory(make_ckpt, tmp_path, case):
    content = TEMPLATE_CASES[case][0]
    return prepared(make_ckpt, tmp_path, content if callable(content) else write_file("chat_template.jinja", content))


@pytest.fixture
def short_deadline(monkeypatch):
    monkeypatch.setattr(sandbox, "RENDER_SECONDS", 0.5)


@pytest.mark.parametrize("case", TEMPLATE_CASES)
def test_template_library_raises_typed_error(make_ckpt, tmp_path, short_deadline, case):
    _, expected, words = TEMPLATE_CASES[case]
    directory = template_directory(make_ckpt, tmp_path, case)
    model = polylm.load(directory, backend="torch")
    before, tracer = snapshot(directory), sys.gettrace()
    with pytest.raises(expected) as caught:
        model.chat([{"role": "user", "content": "hi"}], max_new_tokens=2)
    for word in words:
        assert word in str(caught.value)
    assert "\n" not in str(caught.value) and snapshot(directory) == before and sys.gettrace() is tracer


@pytest.mark.parametrize("case", ["nested-range-loops", "repeat-300M", "recursive-macro", "not-utf8", "fifo",
                                  "json-list", "refuses-messages"])
def test_template_cli_exits_2_with_one_line(make_ckpt, tmp_path, capsys, monkeypatch, short_deadline, case):
    directory = template_directory(make_ckpt, tmp_path, case)
    before = snapshot(directory)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi"))
    capsys.readouterr()
    assert main(["chat", "--model", str(directory), "--backend", "torch", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("polylm: error: ") and TEMPLATE_CASES[case][2][0] in err
    assert snapshot(directory) == before


def test_cli_chat_template_file_is_read_safely(make_ckpt, tmp_path, capsys, monkeypatch):
    os.mkfifo(tmp_path / "template.jinja")
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi"))
    capsys.readouterr()
    assert main(["chat", "--model", str(make_ckpt("helium")), "--backend", "torch",
                 "--chat-template", str(tmp_path / "template.jinja")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "template.jinja: is a named pipe" in err


def test_chat_template_limits_leave_real_templates_alone(make_ckpt):
    """A ChatML template with loops, filters, concatenation and namespace renders as before, in milliseconds."""
    template = ("{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
                "{{ '<|im_start|>' ~ m.role ~ '\\n' ~ m.content|trim ~ '<|im_end|>' ~ '\\n' }}{% endfor %}"
                "{{ ns.n * 2 }}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    text = polylm.generate.chat.render(template, [{"role": "user", "content": " hi "}], {})
    assert text == "<|im_start|>user\nhi<|im_end|>\n2<|im_start|>assistant\n"
