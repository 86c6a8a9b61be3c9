"""The built-in Phi, StableLM and GPT-NeoX families against transformers: parity per family × backend × task
(fp32, padding on both sides, greedy ids) with their quirks set away from the defaults, the legacy Pythia RoPE
keys, and GPT-NeoX's parallel block over two tensor-parallel ranks."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import polylm
from polylm import testing
from polylm.loading import model_ir
from polylm.parallel.ranks import free_port
from test_heads import qa_reference, with_qa_head
from test_parity import BACKENDS, TASKS, assert_parity
from test_tensor_parallel import WORKER, assert_matches_one_process, run_two_ranks

DIMS = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=256)
#: Per family, the causal-LM config (quirks away from their defaults) and the config of every other task
#: (each residual form is in one of the two).
CONFIGS = {
    "phi": (dict(qk_layernorm=True, partial_rotary_factor=0.75, rope_theta=500.0, layer_norm_eps=1e-3),
            dict(num_key_value_heads=2, hidden_act="gelu", layer_norm_eps=1e-4)),
    "stablelm": (dict(num_key_value_heads=2, use_parallel_residual=True, use_qkv_bias=True, partial_rotary_factor=0.5,
                      rope_theta=500.0, layer_norm_eps=1e-3, tie_word_embeddings=True),
                 dict(num_key_value_heads=4, use_parallel_residual=False, hidden_act="gelu")),
    "gpt_neox": (dict(use_parallel_residual=False, rotary_pct=0.5, rotary_emb_base=500.0, layer_norm_eps=1e-3,
                      tie_word_embeddings=True),
                 dict(use_parallel_residual=True, attention_bias=False, hidden_act="gelu_new")),
}
#: Families transformers has no question-answering class for: their base model plus a `qa_outputs` head.
NO_HF_QA = ("phi", "stablelm")


def checkpoint(root, family, task="causal-lm", *, like=None, **overrides):
    """The family's tiny checkpoint for `task`, built once, with the config of task `like` (default `task`: the
    causal-LM config or the other tasks' one) and `overrides`."""
    config = CONFIGS[family][(like or task) != "causal-lm"]
    return testing.tiny_checkpoint(root, family, task, **{**DIMS, **config, **overrides})


def qa_checkpoint(root, family):
    """The other tasks' base model of `family` with a random `qa_outputs` head."""
    base = checkpoint(root, family, like="question-answering")
    return with_qa_head(base, root / f"{base.name}-qa")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family,task", [(f, t) for f in CONFIGS for t in TASKS])
def test_matches_transformers(ckpt_root, family, task, backend):
    if task == "question-answering" and family in NO_HF_QA:
        directory = qa_checkpoint(ckpt_root, family)
        assert_parity(directory, task, backend, hf=qa_reference(directory))
    else:
        assert_parity(checkpoint(ckpt_root, family, task), task, backend)


def test_quirks_reach_the_ir(ckpt_root):
    phi, stablelm, neox = (model_ir(checkpoint(ckpt_root, family)) for family in CONFIGS)
    assert phi.block.parallel and phi.block.mlp_norm is None and phi.head.bias
    assert phi.attention.qk_norm.scope == "head" and phi.attention.qk_norm.norm.eps == 1e-3
    assert phi.attention.rotary_dim == 12 and phi.block.mlp.activation == "gelu_tanh"
    assert stablelm.block.parallel and stablelm.block.mlp_norm is None and stablelm.attention.rotary_dim == 8
    assert stablelm.attention.qkv_bias and not stablelm.attention.out_bias and stablelm.head.tied_to_embedding
    assert not neox.block.parallel and neox.attention.qkv_layout == "fused_per_kv_group"
    assert neox.attention.rotary_dim == 8 and neox.attention.position.theta == 500.0
    assert neox.block.mlp_norm.eps == 1e-3 and neox.head.tied_to_embedding
    other = model_ir(checkpoint(ckpt_root, "gpt_neox", "sequence-classification"))
    assert other.block.parallel and other.block.mlp_norm is not None and not other.attention.qkv_bias


def test_gpt_neox_reads_the_legacy_rope_keys(ckpt_root, tmp_path):
    """Pythia's own configs say `rotary_pct` and `rotary_emb_base`; `rope_parameters`, where given, wins."""
    directory = checkpoint(ckpt_root, "gpt_neox")
    config = json.loads((directory / "config.json").read_text())
    legacy = {k: v for k, v in config.items() if k != "rope_parameters"}
    (tmp_path / "config.json").write_text(json.dumps({**legacy, "rotary_pct": 0.25, "rotary_emb_base": 40.0}))
    position = model_ir(tmp_path).attention.position
    assert (position.rotary_fraction, position.theta) == (0.25, 40.0)
    (tmp_path / "config.json").write_text(json.dumps({**config, "rotary_pct": 0.25}))
    assert model_ir(tmp_path).attention.position.rotary_fraction == 0.5


def test_gpt_neox_parallel_block_two_ranks_match_one_process(ckpt_root, tmp_path):
    from polylm_torch_common.parallel import param_bytes

    directory = checkpoint(ckpt_root, "gpt_neox", like="sequence-classification")
    port = str(free_port())
    rank0, rank1 = run_two_ranks(WORKER, {"neox": str(directory)}, tmp_path, lambda r: dict(
        RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
    single = polylm.load(directory, backend="torch")
    assert single.ir.block.parallel and single.ir.block.mlp_norm is not None
    assert_matches_one_process(rank0["neox"], single)
    whole = param_bytes(single.runtime.params)
    assert all(r["neox"]["held_bytes"] < 0.6 * whole for r in (rank0, rank1))


def test_gpt_neox_ignores_stale_buffers(ckpt_root, tmp_path):
    """Older GPT-NeoX checkpoints carry the causal-mask and rotary buffers; they change nothing."""
    directory = checkpoint(ckpt_root, "gpt_neox")
    tensors = load_file(directory / "model.safetensors")
    for i in range(DIMS["num_hidden_layers"]):
        tensors[f"gpt_neox.layers.{i}.attention.bias"] = torch.ones(1, 1, 8, 8, dtype=torch.bool).tril()
        tensors[f"gpt_neox.layers.{i}.attention.masked_bias"] = torch.tensor(-1e9)
        tensors[f"gpt_neox.layers.{i}.attention.rotary_emb.inv_freq"] = torch.ones(4)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((directory / name).read_bytes())
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ids = np.array([[1, 5, 9, 44, 21]])
    expected = polylm.load(directory, backend="torch").forward(ids)
    assert (polylm.load(tmp_path, backend="torch").forward(ids) == expected).all()
