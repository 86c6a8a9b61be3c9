"""Every bad input gets a typed error naming where and what — in the library and the CLI — and nothing
in the model directory is ever written."""

import json
import shutil
import struct
from pathlib import Path

import pytest

import polylm
from polylm.backend import Availability, Backend
from polylm.cli import main
from polylm.errors import (BackendError, ConfigError, InputError, IRError, TaskError, TokenizerError,
                           WeightsError)
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
    "config-billion-layers": (edit_config(num_hidden_layers=10**9), LOAD, WeightsError,
                              ["declares 1000000000 layers"]),
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
}


class _StubBackend(Backend):
    def __init__(self, name, available, dtypes=("float32",)):
        self.name, self._available, self.dtypes = name, available, dtypes
        self.install_hint = "pip install stub"
        self.priority = -100

    def availability(self):
        return Availability(self._available, "ready" if self._available else "stub hardware missing")

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
    assert len(CASES) >= 30
