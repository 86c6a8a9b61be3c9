"""`polylm inspect`: parameter counts against transformers' num_parameters(), bytes per dtype and quantized, KV-cache
bytes, the JSON keys, that no tensor data is read (a NaN norm load refuses, a sparse 16 GB checkpoint), and the
one-line errors of the other commands."""

import dataclasses
import json
import struct
import sys

import pytest

import polylm
from polylm import testing
from polylm.cli import EXIT_USER_ERROR, main
from polylm.cli.inspect import render
from polylm.demo import DEMO_MODEL
from polylm.errors import WeightsError
from polylm.ir import MLP, Attention, Block, Embedding, Head, ModelIR, Norm, RoPE
from polylm.backend import PASS_LIMIT
from polylm.loading.inspect import PARTS, inspect, ir_data, kv_cache_bytes

LLAMA = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, max_position_embeddings=256)
#: family → (model_type, tiny_checkpoint arguments beyond the model type)
CHECKPOINTS = {
    "llama": ("llama", dict(LLAMA, attention_bias=True, tie_word_embeddings=False)),
    "llama-tied": ("llama", dict(LLAMA, tie_word_embeddings=True)),
    "qwen3": ("qwen3", dict(LLAMA, tie_word_embeddings=False)),  # per-head q/k norms
    "gemma": ("gemma", dict(LLAMA)),  # tied, Gemma's 1 + w norms
    "gpt2": ("gpt2", dict(n_embd=64, n_layer=2, n_head=4, n_positions=64)),  # Conv1D storage, stacked c_attn
    "bloom": ("bloom", dict(hidden_size=64, n_layer=2, n_head=4)),  # fused per-head qkv
    "helium-classifier": ("helium", dict(LLAMA, task="sequence-classification")),  # a task head of 3 labels
}


def checkpoint(root, name, dtype="float32"):
    model_type, options = CHECKPOINTS[name]
    return testing.tiny_checkpoint(root, model_type, dtype=dtype, **options)


def cli(capsys, *args):
    code = main(["inspect", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_parameters_equal_transformers_num_parameters(ckpt_root, name):
    model_type, options = CHECKPOINTS[name]
    report = inspect(checkpoint(ckpt_root, name))
    assert report.parameters["total"] == testing.tiny_model(model_type, **options).num_parameters()
    assert report.parameters["total"] == sum(report.parameters[part] for part in PARTS)
    assert report.family == model_type and report.plugin.distribution == "polylm"
    assert report.tokenizer and report.chat_template is None


def test_parameters_per_part(ckpt_root):
    hidden, inter, q, kv, vocab = 64, 96, 4 * 16, 2 * 16, testing.VOCAB
    biases = q + 2 * kv + hidden  # q, k, v, o
    attention = 2 * (hidden * q + 2 * hidden * kv + q * hidden + biases)  # 2 layers
    untied = inspect(checkpoint(ckpt_root, "llama")).parameters
    assert untied == {"embedding": vocab * hidden, "attention": attention, "mlp": 2 * 3 * hidden * inter,
                      "norms": (2 * 2 + 1) * hidden, "head": vocab * hidden,
                      "total": 2 * vocab * hidden + attention + 2 * 3 * hidden * inter + 5 * hidden}
    tied = inspect(checkpoint(ckpt_root, "llama-tied")).parameters  # the tied head counts once, as the embedding
    assert tied["head"] == 0 and tied["embedding"] == vocab * hidden
    assert tied["total"] == untied["total"] - vocab * hidden - 2 * biases  # nor has it the attention biases
    assert inspect(checkpoint(ckpt_root, "helium-classifier")).parameters["head"] == 3 * hidden


def test_bytes_per_dtype_of_a_bf16_checkpoint_and_quantized(ckpt_root):
    report = inspect(checkpoint(ckpt_root, "llama", dtype="bfloat16"))
    total = report.parameters["total"]
    assert report.weight_bytes == {"bfloat16": 2 * total}
    hidden, inter, q, kv, vocab = 64, 96, 64, 32, testing.VOCAB
    # (rows, columns) of the quantized matrices: per layer q, k, v, o, gate, up, down; the untied head
    matrices = [(q, hidden), (kv, hidden), (kv, hidden), (hidden, q), (inter, hidden), (inter, hidden),
                (hidden, inter)] * 2 + [(vocab, hidden)]
    elements = sum(r * c for r, c in matrices)
    rest = 2 * (total - elements)  # the embedding, norms and biases stay bfloat16
    assert report.quantized_bytes["int8"] == {"bfloat16": rest, "int8": elements + 4 * sum(r for r, _ in matrices)}
    int4_scales = 2 * sum(r * -(-c // 32) for r, c in matrices)  # bfloat16 scales per 32 inputs (96: 3 groups)
    assert report.quantized_bytes["int4"] == {"bfloat16": rest, "int4": elements // 2 + int4_scales}
    assert report.kv_dtype == "bfloat16"


def test_kv_cache_bytes(ckpt_root, capsys):
    directory = checkpoint(ckpt_root, "llama")
    report = inspect(directory)
    per_token = 2 * 2 * 2 * 16 * 4  # layers × (keys, values) × kv heads × head_dim × float32
    assert (report.kv_dtype, report.kv_bytes_per_token, report.kv_bytes_at_context) == \
        ("float32", per_token, per_token * 256)
    assert inspect(directory, dtype="bfloat16").kv_bytes_per_token == per_token // 2
    code, out, _ = cli(capsys, directory, "--dtype", "float16", "--json")
    assert code == 0 and json.loads(out)["kv_cache"] == {"dtype": "float16", "bytes_per_token": per_token // 2,
                                                         "context_length": 256, "bytes_at_context": per_token * 128}


def _block(window=None):
    norm = Norm("rms", 1e-6)
    return Block(norm, Attention(8, 2, 64, RoPE(10000.0, 4096), window=window), norm, MLP(256, "silu", True))


def _ir(blocks):
    norm = Norm("rms", 1e-6)
    return ModelIR("test", Embedding(100, 128), blocks[0], 1, norm, Head("causal-lm", 100), 4096).with_layers(blocks)


def test_kv_cache_of_windowed_layers_holds_the_window():
    layer = 2 * 2 * 64 * 2  # keys and values, 2 kv heads, head_dim 64, bfloat16
    mixed = _ir([_block(1024), _block(1024), _block(), _block(1024)])
    ring = 1024 + PASS_LIMIT  # the window, one pass's tokens (but one) and the spare slot (`polylm.backend.Ring`)
    assert kv_cache_bytes(mixed, "bfloat16") == (4 * layer, layer * (3 * ring + 4096))
    wide = _ir([_block(8192)] * 2)  # a window past the context holds the context
    assert kv_cache_bytes(wide, "bfloat16") == (2 * layer, 2 * layer * 4096)


def test_json_keys_and_human_tree(ckpt_root, capsys):
    directory = checkpoint(ckpt_root, "gpt2")
    code, out, err = cli(capsys, "--json", directory)
    assert code == 0 and err == ""
    data = json.loads(out)
    assert set(data) == {"model", "directory", "model_type", "family", "plugin", "task", "notes", "ir", "parameters",
                         "weights", "kv_cache", "backend", "tokenizer", "chat_template"}
    assert data["plugin"] == {"entry_point": "gpt2", "distribution": "polylm", "version": polylm.__version__}
    assert set(data["parameters"]) == {*PARTS, "total"} and data["task"] == "causal-lm"
    assert data["weights"]["bytes_by_dtype"] == {"float32": 4 * data["parameters"]["total"]}
    assert set(data["weights"]["quantized_bytes"]) == {"int8", "int4"}
    assert data["ir"]["num_layers"] == 2 and data["ir"]["block"]["attention"]["position"] is None
    assert data["ir"]["embedding"]["positions"] == {"max_positions": 64}
    assert data["backend"]["auto"] == polylm.load(directory).backend
    assert [b["name"] for b in data["backend"]["backends"]] == [b["name"] for b in polylm.backends()]
    assert data["tokenizer"] is True and data["chat_template"] is None
    assert cli(capsys, "--model", directory, "--json") == (0, out, "")  # --model as the other commands take it

    code, out, _ = cli(capsys, checkpoint(ckpt_root, "bloom"))
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith(f"{checkpoint(ckpt_root, 'bloom')}: bloom (model_type bloom; plugin polylm")
    assert "├─ layers 0–1 (2)" in out
    assert "│  ├─ attention  4 heads, 4 key/value heads, head_dim 16, ALiBi" in out
    assert "q/k/v stored fused per head" in out and "├─ head            causal-lm, 320 outputs, tied to the" in out
    report = inspect(checkpoint(ckpt_root, "bloom"))
    assert f"parameters     {report.parameters['total']:,} (embedding 20,480 · attention" in out
    assert "KV cache       float32 1.0 KiB per token · 2.0 MiB at the full context (2048 tokens)" in out
    assert f"backend        auto → {report.backend.auto}, the first in auto order that runs here" in out
    assert "tokenizer      tokenizer.json · chat template: none" in out


def test_layer_kinds_show_as_one_subtree_each(ckpt_root):
    mixed = _ir([_block(1024), _block(1024), _block(), _block(1024), _block(1024)])
    text = render(dataclasses.replace(inspect(checkpoint(ckpt_root, "llama")), ir=mixed))
    assert "├─ layers 0–1, 3–4 (4 of 5)  attention, then MLP" in text and "├─ layers 2 (1 of 5)" in text
    assert text.count("RoPE θ=10000, window 1024") == 1 and text.count("RoPE θ=10000\n") == 1
    variants = ir_data(mixed)["variants"]
    assert mixed.layer_kinds == (0, 0, 1, 0, 0) and variants[0]["attention"]["window"] is None
    assert variants[0]["attention"]["position"]["type"] == "rope"


def test_without_a_model_it_inspects_the_demo_model(capsys):
    code, out, _ = cli(capsys, "--json")
    data = json.loads(out)
    assert code == 0 and data["directory"] == str(DEMO_MODEL) and data["family"] == "helium"
    assert data["parameters"]["total"] == 2_164_416  # the README's 2.2M-parameter Helium


def test_reads_no_tensor_data(ckpt_root, tmp_path):
    """A NaN in a norm weight is the one thing `load` reads tensor data to refuse before lowering: inspect answers."""
    from safetensors.torch import load_file, save_file

    directory = tmp_path / "nan"
    source = checkpoint(ckpt_root, "llama")
    directory.mkdir()
    for path in source.iterdir():
        (directory / path.name).write_bytes(path.read_bytes())
    tensors = load_file(directory / "model.safetensors")
    tensors["model.norm.weight"][3] = float("nan")
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(WeightsError, match="NaN"):
        polylm.load(directory, backend="torch")
    assert inspect(directory).parameters == inspect(source).parameters


def test_a_16_gb_checkpoint_answers_from_its_header(tmp_path):
    """Llama-3-8B's shapes in a sparse file: its header says 16 GB of bfloat16 that were never written."""
    import torch
    import transformers

    config = transformers.LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                      max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    header, offset = {}, 0
    for name, tensor in model.state_dict().items():
        size = 2 * tensor.numel()
        header[name] = {"dtype": "BF16", "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    with open(tmp_path / "model.safetensors", "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        fh.truncate(8 + len(raw) + offset)  # sparse: no data block is ever written
    config.save_pretrained(tmp_path)

    def bytes_read() -> int:
        with open("/proc/self/io") as fh:
            return int(next(line for line in fh if line.startswith("rchar:")).split()[1])

    before = bytes_read() if sys.platform.startswith("linux") else 0
    report = inspect(tmp_path)
    if sys.platform.startswith("linux"):
        assert bytes_read() - before < 2**20  # the header and a few small files, not 16 GB
    assert report.parameters["total"] == model.num_parameters() == 8_030_261_248
    assert report.weight_bytes == {"bfloat16": 2 * 8_030_261_248}
    assert report.kv_bytes_per_token == 32 * 2 * 8 * 128 * 2 == 131072  # 128 KiB per token, 1 GiB at 8192
    assert report.kv_bytes_at_context == 131072 * 8192 and not report.tokenizer


@pytest.mark.parametrize("make,message", [
    (lambda tmp: tmp / "missing", "model directory not found"),
    (lambda tmp: _write(tmp / "model.safetensors", b"x"), "is a file, not a model directory"),
    (lambda tmp: _write(tmp / "config.json", b"{oops").parent, "config.json: not valid JSON"),
    (lambda tmp: _write(tmp / "config.json", b'{"model_type": "nope"}').parent, "unknown model_type 'nope'"),
    (lambda tmp: _write(tmp / "config.json", json.dumps({"model_type": "llama", **LLAMA, "vocab_size": 320})
                        .encode()).parent, "no model.safetensors"),
])
def test_bad_inputs_give_one_line_errors(tmp_path, capsys, make, message):
    code, out, err = cli(capsys, make(tmp_path))
    assert code == EXIT_USER_ERROR and out == ""
    assert err.count("\n") == 1 and err.startswith("polylm: error: ") and message in err


def _write(path, data: bytes):
    path.write_bytes(data)
    return path
