"""Gemma 2 and StableLM's per-head query/key norms against transformers: parity per backend × task (fp32, padding
on both sides, greedy ids) with the quirks set away from their defaults and softcaps small enough to bite; the
variant Gemma 2 declines; StableLM's per-head norm tensors over two tensor-parallel ranks."""

import json

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

import polylm
import polylm.backend
from polylm import testing
from polylm.errors import ConfigError, WeightsError
from polylm.ir import Norm
from polylm.loading import model_ir
from polylm.parallel.ranks import free_port
from test_heads import qa_reference, with_qa_head
from test_parity import BACKENDS, TASKS, assert_parity
from test_tensor_parallel import WORKER, assert_matches_one_process, run_two_ranks

DIMS = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=256)
#: Gemma 2's causal-LM config (quirks away from their defaults; local layers by the default alternation) and its
#: other tasks' config (local layers by layer_types); both windows shorter than the prompts.
GEMMA2 = (dict(head_dim=16, num_key_value_heads=2, query_pre_attn_scalar=24, attn_logit_softcapping=0.5,
               final_logit_softcapping=3.0, sliding_window=4, rms_norm_eps=1e-3, rope_theta=500.0,
               attention_bias=True),
          dict(head_dim=32, num_key_value_heads=1, query_pre_attn_scalar=8, attn_logit_softcapping=1.0,
               sliding_window=5, layer_types=["full_attention", "sliding_attention"], hidden_activation="silu",
               tie_word_embeddings=False))
#: StableLM with per-head query/key LayerNorms, in either residual form.
STABLELM = dict(qk_layernorm=True, num_key_value_heads=2, partial_rotary_factor=0.5, layer_norm_eps=1e-3)


def gemma2(root, task="causal-lm", *, like=None, **overrides):
    config = GEMMA2[(like or task) != "causal-lm"]
    return testing.tiny_checkpoint(root, "gemma2", task, **{**DIMS, **config, **overrides})


def stablelm(root, task="causal-lm", parallel=True):
    return testing.tiny_checkpoint(root, "stablelm", task, **DIMS, **STABLELM, use_parallel_residual=parallel)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("task", TASKS)
def test_gemma2_matches_transformers(ckpt_root, monkeypatch, task, backend):
    monkeypatch.setattr(polylm.backend, "PASS_LIMIT", 3)  # rings of window + 2 slots: they wrap in every prompt
    if task == "question-answering":  # transformers has none: its base model plus a `qa_outputs` head
        directory = with_qa_head(gemma2(ckpt_root, like=task), ckpt_root / "gemma2-qa")
        assert_parity(directory, task, backend, hf=qa_reference(directory))
    else:
        assert_parity(gemma2(ckpt_root, task), task, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("parallel", [True, False])
def test_stablelm_per_head_norms_match_transformers(ckpt_root, backend, parallel):
    assert_parity(stablelm(ckpt_root, parallel=parallel), "causal-lm", backend)


def test_stablelm_per_head_norms_other_task(ckpt_root):
    assert_parity(stablelm(ckpt_root, "sequence-classification"), "sequence-classification", "torch")


def test_quirks_reach_the_ir(ckpt_root):
    ir = model_ir(gemma2(ckpt_root))
    attention, block = ir.attention, ir.block
    assert attention.softcap == 0.5 and attention.softmax_scale == 24 ** -0.5
    assert [block.attention.window for block in ir.layers] == [4, None]
    assert ir.head.softcap == 3.0 and ir.embedding.scale == 8.0 and ir.head.tied_to_embedding
    assert block.attn_post_norm == block.mlp_post_norm == block.mlp_norm == Norm("rms", 1e-3, weight_offset=1.0)
    assert block.mlp.activation == "gelu_tanh" and attention.qkv_bias
    other = model_ir(gemma2(ckpt_root, "sequence-classification"))
    assert other.head.softcap is None and other.attention.softcap == 1.0 and other.block.mlp.activation == "silu"
    assert [block.attention.window for block in other.layers] == [None, 5]
    per_head = model_ir(stablelm(ckpt_root)).attention.qk_norm
    assert per_head.scope == "head_each" and per_head.norm.kind == "layer" and not per_head.norm.bias


def test_softcaps_bite(ckpt_root, tmp_path):
    """Without its softcaps the checkpoint's logits move: the parity above tests them."""
    directory = gemma2(ckpt_root)
    config = json.loads((directory / "config.json").read_text())
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((directory / name).read_bytes())
    ids = np.array([[1, 5, 9, 44, 21, 7, 3]])
    capped = polylm.load(directory, backend="torch").forward(ids)
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        (tmp_path / "config.json").write_text(json.dumps({**config, key: None}))
        uncapped = polylm.load(tmp_path, backend="torch").forward(ids)
        assert np.abs(uncapped - capped).max() > 0.05, key


def test_gemma2_declined_variant_names_the_key(ckpt_root):
    directory, key = gemma2(ckpt_root, use_bidirectional_attention=True), "use_bidirectional_attention=true"
    with pytest.raises(ConfigError) as error:
        polylm.load(directory, backend="torch")
    message = str(error.value)
    assert message.startswith(f"{directory / 'config.json'}: every family claiming model_type 'gemma2' declined")
    assert key in message


def test_gemma2_global_layers_only_or_no_window(ckpt_root, tmp_path):
    """Global layers only (layer_types), or no window (null): no sliding layer."""
    ir = model_ir(gemma2(ckpt_root, sliding_window=16, layer_types=["full_attention", "full_attention"]))
    assert ir.attention.window is None and not ir.variants
    config = json.loads((gemma2(ckpt_root) / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "sliding_window": None}))
    assert model_ir(tmp_path).attention.window is None


def test_stablelm_missing_head_norm_is_named(ckpt_root, tmp_path):
    directory = stablelm(ckpt_root)
    tensors = load_file(directory / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_layernorm.norms.1.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_bytes((directory / "config.json").read_bytes())
    with pytest.raises(WeightsError, match=r"missing tensor 'model\.layers\.1\.self_attn\.k_layernorm\.norms\.1"
                                           r"\.weight' \(head 1 of layers\.1\.attn\.k_norm\.weight"):
        polylm.load(tmp_path, backend="torch")


def test_stablelm_per_head_norms_two_ranks_match_one_process(ckpt_root, tmp_path):
    directory = stablelm(ckpt_root, parallel=False)
    port = str(free_port())
    rank0, _ = run_two_ranks(WORKER, {"stablelm": str(directory)}, tmp_path, lambda r: dict(
        RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
    single = polylm.load(directory, backend="torch")
    assert single.ir.attention.qk_norm.scope == "head_each"
    assert_matches_one_process(rank0["stablelm"], single)
