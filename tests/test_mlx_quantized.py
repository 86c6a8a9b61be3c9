"""MLX-format quantized checkpoints (what mlx-lm writes) on every backend, and `polylm convert`.

The quantized checkpoints here are made by `mx.quantize` in the test itself (not by polylm's converter), with
mlx-lm's per-module exceptions: a module the config leaves unquantized (false), one with its own bits, MLP down
projections left as they are where their input size does not divide the group, and a quantized embedding the
head is tied to. Each must give the logits of the same checkpoint with those weights replaced by
`mx.dequantize`'s output, in float32, on every backend.
"""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import polylm
from polylm.cli import main
from polylm.errors import BackendError, WeightsError
from polylm.loading.inspect import inspect
from polylm_mlx.params import Halves
from polylm.numerics.quantization import AffineQuantization, affine_dequantize, affine_quantize
from polylm.testing import tiny_checkpoint

BACKENDS = ["torch", "mlx", "triton"]
#: quantized vs dense on the dequantized weights, float32: only the order of operations differs
EXACT = 1e-4
IDS = [[1, 5, 9, 17, 33, 65, 129, 257], [1, 300, 7, 7, 2, 40, 41, 42]]
#: per-module exceptions (mlx-lm's config keys are module paths)
UNQUANTIZED = "model.layers.0.self_attn.k_proj"
OWN_BITS = "model.layers.1.self_attn.v_proj"


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny tied Llama: the MLP's down projection takes 96 inputs (not a multiple of 64)."""
    return tiny_checkpoint(tmp_path_factory.mktemp("mlxq"), "llama", hidden_size=64, intermediate_size=96,
                           num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                           tie_word_embeddings=True)


def mlx_quantize(source, target, group_size, bits):
    """`source` quantized as mlx-lm does it, with `mx.quantize`, plus the dequantized reference beside it."""
    tensors = load_file(source / "model.safetensors")
    quantized, dequantized = {}, {}
    config = json.loads((source / "config.json").read_text())
    settings = {"group_size": group_size, "bits": bits, UNQUANTIZED: False,
                OWN_BITS: {"group_size": group_size, "bits": 8 if bits == 4 else 4}}
    for key, value in tensors.items():
        module = key[:-len(".weight")]
        if value.ndim != 2 or module == UNQUANTIZED or value.shape[1] % group_size or "lm_head" in key:
            quantized[key] = dequantized[key] = value
            continue
        own = settings.get(module, settings)
        codes, scales, biases = mx.quantize(mx.array(value), group_size=own["group_size"], bits=own["bits"])
        quantized.update({key: np.array(codes), f"{module}.scales": np.array(scales),
                          f"{module}.biases": np.array(biases)})
        dequantized[key] = np.array(mx.dequantize(codes, scales, biases, group_size=own["group_size"],
                                                  bits=own["bits"]))
    for directory, data, extra in ((target, quantized, {"quantization": settings, "quantization_config": settings}),
                                   (target.with_name(target.name + "-reference"), dequantized, {})):
        shutil.copytree(source, directory)
        save_file(data, str(directory / "model.safetensors"))
        (directory / "config.json").write_text(json.dumps({**config, **extra}))
    return target, target.with_name(target.name + "-reference")


def logits(directory, backend):
    model = polylm.load(directory, backend=backend, dtype="float32")
    return np.asarray(model.forward(IDS), dtype=np.float32)


@pytest.mark.parametrize("group_size,bits", [(32, 4), (64, 4), (32, 8), (64, 8)])
def test_quantized_checkpoint_equals_dequantized_reference(source, tmp_path, group_size, bits):
    quantized, reference = mlx_quantize(source, tmp_path / "q", group_size, bits)
    stored = load_file(quantized / "model.safetensors")
    assert stored["model.embed_tokens.weight"].dtype == np.uint32  # the tied embedding is quantized
    assert "model.layers.0.self_attn.k_proj.scales" not in stored
    assert ("model.layers.0.mlp.down_proj.scales" in stored) == (group_size == 32)
    expected = logits(reference, "torch")
    for backend in BACKENDS:
        got = logits(quantized, backend)
        assert np.abs(got - expected).max() < EXACT, backend
    assert np.abs(logits(source, "torch") - expected).max() > 1e-3  # the quantization does change the model


def test_mlx_keeps_the_stored_arrays(source, tmp_path):
    quantized, _ = mlx_quantize(source, tmp_path / "q", 64, 4)
    params = polylm.load(quantized, backend="mlx", dtype="float32").runtime.params
    stored = load_file(quantized / "model.safetensors")
    assert params.head.bits == 4 and params.head.group_size == 64  # the tied head multiplies the stored arrays
    np.testing.assert_array_equal(np.array(params.head.weight), stored["model.embed_tokens.weight"])
    np.testing.assert_array_equal(np.array(params.layers[0].out.scales),
                                  stored["model.layers.0.self_attn.o_proj.scales"])
    assert params.layers[1].up.bits == 4 and isinstance(params.layers[0].down, Halves)  # 96 inputs: dense


def test_numerics_equal_mlx():
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((8, 256)).astype(np.float32) * rng.uniform(0.01, 3, (8, 1)).astype(np.float32)
    weight[0, :64] = 0.5  # a constant group
    for dtype in ("float32", "bfloat16", "float16"):
        values = mx.array(weight).astype(getattr(mx, dtype))
        for bits in (3, 4, 8):
            spec = AffineQuantization(bits, 64)
            codes, scales, biases = (np.array(a.astype(mx.float32)) if a.dtype != mx.uint32 else np.array(a)
                                     for a in mx.quantize(values, group_size=64, bits=bits))
            ours = affine_quantize(np.array(values.astype(mx.float32)), spec, dtype)
            for a, b in zip(ours, (codes, scales, biases)):
                np.testing.assert_array_equal(a, b)
            dequantized = mx.dequantize(mx.array(codes), *(mx.array(a).astype(values.dtype) for a in (scales, biases)),
                                        group_size=64, bits=bits)
            np.testing.assert_array_equal(affine_dequantize(codes, scales, biases, spec, dtype),
                                          np.array(dequantized.astype(mx.float32)))


def test_convert_round_trip(source, tmp_path):
    out = tmp_path / "int4"
    assert main(["convert", str(source), str(out), "--quantize", "int4", "--group-size", "32"]) == 0
    original, written = load_file(source / "model.safetensors"), load_file(out / "model.safetensors")
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == config["quantization_config"] == {"group_size": 32, "bits": 4,
                                                                       "mode": "affine"}
    assert (out / "tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()
    quantized = 0
    for key, value in original.items():
        if key.endswith("norm.weight") or "lm_head" in key:
            assert key not in written or np.array_equal(written[key], value)
            continue
        module = key[:-len(".weight")]
        expected = mx.quantize(mx.array(value), group_size=32, bits=4)
        for name, array in zip(("weight", "scales", "biases"), expected):
            np.testing.assert_array_equal(written[f"{module}.{name}"], np.array(array))
        quantized += 1
    assert quantized == 1 + 2 * 7  # the embedding, and 7 projections per layer
    # it loads as it is, and gives the dequantized model's logits
    reference = tmp_path / "reference"
    shutil.copytree(source, reference)
    save_file({key: np.array(mx.dequantize(mx.array(written[key]), mx.array(written[key[:-6] + "scales"]),
                                           mx.array(written[key[:-6] + "biases"]), group_size=32, bits=4))
               if written[key].dtype == np.uint32 else value for key, value in written.items()
               if not key.endswith((".scales", ".biases"))}, str(reference / "model.safetensors"))
    for backend in ("torch", "mlx"):
        assert np.abs(logits(out, backend) - logits(reference, "torch")).max() < EXACT
    with pytest.raises(BackendError, match="quantize it twice"):
        polylm.load(out, quantize="int8")
    report, before = inspect(out), inspect(source)
    assert report.parameters == before.parameters
    stored = sum(value.nbytes for key, value in written.items() if value.dtype == np.uint32 or
                 key.endswith((".scales", ".biases")))
    assert report.weight_bytes["mlx-int4"] == stored


def test_bad_packed_shape_and_missing_scales(source, tmp_path):
    quantized, _ = mlx_quantize(source, tmp_path / "q", 64, 4)
    tensors = load_file(quantized / "model.safetensors")
    key = "model.layers.1.mlp.up_proj"
    cut = dict(tensors, **{f"{key}.weight": tensors[f"{key}.weight"][:, :-1].copy()})
    save_file(cut, str(quantized / "model.safetensors"))
    with pytest.raises(WeightsError, match=rf"{key}.weight.* has shape \[96, 7\].*pack as \[96, 8\]"):
        polylm.load(quantized, backend="torch")
    del tensors[f"{key}.scales"]
    save_file(tensors, str(quantized / "model.safetensors"))
    with pytest.raises(WeightsError, match=rf"{key}.weight.* is quantized .* but {key}.scales is missing"):
        polylm.load(quantized, backend="torch")


def test_mlx_lm_loads_a_converted_checkpoint(source, tmp_path):
    """Where mlx-lm is installed: it loads `polylm convert`'s output as quantized layers, with polylm's logits."""
    import mlx_lm  # a test dependency (pyproject's `test` extra): missing, this fails rather than skips
    out = tmp_path / "int4"
    main(["convert", str(source), str(out), "--quantize", "int4", "--group-size", "32"])
    model, _ = mlx_lm.load(str(out))
    kinds = {type(module).__name__ for _, module in model.named_modules()}
    assert {"QuantizedEmbedding", "QuantizedLinear"} <= kinds and "Linear" not in kinds
    theirs = np.array(model(mx.array(IDS)).astype(mx.float32))
    assert np.abs(theirs - logits(out, "mlx")).max() < EXACT
