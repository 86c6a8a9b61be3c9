"""Real checkpoint forms load and match transformers: config key variants, prefixes, dtypes, shards."""

import json

import numpy as np
import pytest
import torch

import checkpoints
import polylm
from polylm.testing import SEQUENCES, max_diff_padded

TOLERANCE = 1e-4


def legacy_rope_keys(config):
    """transformers v4 / Hub form: top-level rope_theta, rope_scaling with 'type', partial_rotary_factor."""
    params = config.pop("rope_parameters")
    config["rope_theta"] = params.pop("rope_theta")
    if "partial_rotary_factor" in params:
        config["partial_rotary_factor"] = params.pop("partial_rotary_factor")
    kind = params.pop("rope_type")
    if kind != "default":
        config["rope_scaling"] = {"type": kind, **params}


def drop_head_dim(config):
    del config["head_dim"]


def bloom_long_names(config):
    config["n_embed"] = config.pop("hidden_size")
    config["num_hidden_layers"] = config.pop("n_layer")
    config["num_attention_heads"] = config.pop("n_head")


def gemma_legacy_gelu(config):
    config["hidden_act"] = "gelu"


def strip_transformer_prefix(name):
    return name.removeprefix("transformer.")


def dtype_key_renamed(config):
    config["torch_dtype"] = config.pop("dtype", "float32")


CASES = {
    "helium-legacy-rope": ("helium", dict(edit_config=legacy_rope_keys), {}),
    "nemotron-legacy-partial-rotary": ("nemotron", dict(edit_config=legacy_rope_keys), {}),
    "arcee-yarn": ("arcee", {}, dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                                       "original_max_position_embeddings": 64})),
    "arcee-yarn-legacy": ("arcee", dict(edit_config=legacy_rope_keys),
                          dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                                "original_max_position_embeddings": 64})),
    "helium-linear": ("helium", {}, dict(rope_parameters={"rope_type": "linear", "factor": 3.0,
                                                           "rope_theta": 500.0})),
    "gemma-llama3": ("gemma", {}, dict(rope_parameters={"rope_type": "llama3", "factor": 8.0, "rope_theta": 50.0,
                                                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                         "original_max_position_embeddings": 16})),
    "nemotron-dynamic": ("nemotron", {}, dict(max_position_embeddings=8,
                                               rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                                "rope_theta": 10000.0,
                                                                "partial_rotary_factor": 0.5})),
    "arcee-derived-head-dim": ("arcee", dict(edit_config=drop_head_dim), {}),
    "bloom-no-prefix": ("bloom", dict(rename=strip_transformer_prefix), {}),
    "bloom-post-ln-residual": ("bloom", {}, dict(apply_residual_connection_post_layernorm=True)),
    "bloom-long-names": ("bloom", dict(edit_config=bloom_long_names), {}),
    "gemma-legacy-gelu": ("gemma", dict(edit_config=gemma_legacy_gelu), {}),
    "gemma-untied": ("gemma", {}, dict(tie_word_embeddings=False)),
    "helium-tied": ("helium", {}, dict(tie_word_embeddings=True)),
    "arcee-attention-bias": ("arcee", {}, dict(attention_bias=True, mlp_bias=True)),
    "helium-sharded": ("helium", dict(shard_size="60KB"), {}),
    "gemma-torch-dtype-key": ("gemma", dict(edit_config=dtype_key_renamed), {}),
}


@pytest.mark.parametrize("case", CASES)
def test_form_matches_transformers(make_ckpt, case):
    family, build_options, config_overrides = CASES[case]
    directory = make_ckpt(family, **build_options, **config_overrides)
    model = polylm.load(directory, backend="torch")
    hf = checkpoints.hf_model(family, **config_overrides)
    for side in ("left", "right"):
        assert max_diff_padded(model, hf, "causal-lm", side) <= TOLERANCE


def test_sharded_checkpoint_really_is_sharded(make_ckpt):
    directory = make_ckpt("helium", shard_size="60KB")
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1


def test_bf16_checkpoint_keeps_its_dtype_and_converts(make_ckpt):
    directory = make_ckpt("gemma", dtype="bfloat16")
    as_stored = polylm.load(directory, backend="torch")
    assert as_stored.dtype == "bfloat16"
    upcast = polylm.load(directory, backend="torch", dtype="float32")
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    assert max_diff_padded(upcast, hf, "causal-lm", "left") <= TOLERANCE
    # bf16 compute against transformers computing in bf16 on the same weights
    hf_bf16 = checkpoints.hf_model("gemma").to(torch.bfloat16)
    ids = np.array([SEQUENCES[0]])
    ours = as_stored.forward(ids)
    with torch.no_grad():
        ref = hf_bf16(torch.tensor(ids)).logits.float().numpy()
    assert np.abs(ours - ref).max() <= 0.1
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


def test_fp16_compute(make_ckpt):
    directory = make_ckpt("helium")
    half = polylm.load(directory, backend="torch", dtype="float16")
    full = polylm.load(directory, backend="torch")
    ids = np.array([SEQUENCES[0]])
    assert np.abs(half.forward(ids) - full.forward(ids)).max() <= 0.05


def test_eos_list_from_generation_config(make_ckpt, tmp_path):
    import shutil

    directory = tmp_path / "model"
    shutil.copytree(make_ckpt("helium"), directory)
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    model = polylm.load(directory, backend="torch")
    assert model.tokenizer.eos_ids == (2, 7)
    assert model.tokenizer.bos_id == 1 and model.tokenizer.pad_id == 0
