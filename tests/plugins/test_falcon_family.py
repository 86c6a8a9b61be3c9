"""The built-in Falcon family against transformers in its three layouts (classic per-head fused q/k/v with ALiBi
or RoPE; multi-query; the new decoder architecture's key/value groups), per backend × task, fp32, padding on both
sides, greedy ids, with its quirks; the core features it needs: the fused per-group q/k/v layout (row order,
tensor-parallel slices) and ALiBi scaled with the logits; and the variant it declines."""

import json
import shutil

import numpy as np
import pytest

import polylm
from polylm import testing
from polylm.backend import Step
from polylm.errors import ConfigError, ParallelError
from polylm.ir import ALiBi, Attention
from polylm.loading import model_ir
from polylm.numerics.layouts import qkv_row_order
from polylm.numerics.positions import alibi_slopes
from polylm.parallel.plan import Shard, TensorSlice, plan_shards
from polylm.parallel.ranks import free_port
from test_parity import BACKENDS, assert_parity
from test_tensor_parallel import WORKER, assert_matches_one_process, run_two_ranks

DIMS = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=320)
CLASSIC = dict(new_decoder_architecture=False, multi_query=False, parallel_attn=False)
#: Each layout with its quirks away from their defaults (multi_query and parallel_attn default to true).
CONFIGS = {
    "classic-alibi": dict(CLASSIC, alibi=True, bias=True, layer_norm_epsilon=1e-3),
    "classic-rope": dict(CLASSIC, rope_theta=300.0, tie_word_embeddings=False, activation="relu"),
    "multi-query": dict(rope_theta=500.0, ffn_hidden_size=96),
    "multi-query-alibi": dict(alibi=True, bias=True),
    "grouped": dict(new_decoder_architecture=True, num_kv_heads=2, bias=True, layer_norm_epsilon=1e-2),
    "grouped-one-norm": dict(new_decoder_architecture=True, num_kv_heads=2, num_ln_in_parallel_attn=1, alibi=True),
}
#: Triton reuses the torch runtime but for its attention kernel: these cover ALiBi, RoPE, one key/value head and groups.
TRITON_LAYOUTS = ("classic-alibi", "multi-query", "grouped-one-norm")
#: The other tasks, each on another layout.
TASK_LAYOUTS = {"sequence-classification": "classic-alibi", "token-classification": "multi-query",
                "question-answering": "grouped"}


def checkpoint(root, layout, task="causal-lm"):
    return testing.tiny_checkpoint(root, "falcon", task, **DIMS, **CONFIGS[layout])


@pytest.mark.parametrize("layout,backend", [(layout, backend) for layout in CONFIGS for backend in BACKENDS
                                            if backend != "triton" or layout in TRITON_LAYOUTS])
def test_causal_lm_matches_transformers(ckpt_root, layout, backend):
    assert_parity(checkpoint(ckpt_root, layout), "causal-lm", backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("task", TASK_LAYOUTS)
def test_task_heads_match_transformers(ckpt_root, task, backend):
    assert_parity(checkpoint(ckpt_root, TASK_LAYOUTS[task], task), task, backend)


def test_layouts_reach_the_ir(ckpt_root):
    irs = {layout: model_ir(checkpoint(ckpt_root, layout)) for layout in CONFIGS}
    classic, rope, mqa = irs["classic-alibi"], irs["classic-rope"], irs["multi-query"]
    assert classic.attention.position == ALiBi(scaled=True) and classic.attention.qkv_layout == "fused_per_kv_group"
    assert classic.attention.num_kv_heads == 4 and classic.attention.qkv_bias and classic.block.mlp.bias
    assert not classic.block.parallel and classic.block.mlp_norm.eps == 1e-3 and classic.head.tied_to_embedding
    assert rope.attention.position.theta == 300.0 and not rope.head.tied_to_embedding
    assert rope.block.mlp.activation == "relu" and not rope.attention.qkv_bias
    assert mqa.attention.num_kv_heads == 1 and mqa.attention.qkv_layout == "separate"  # stacked rows [q | k | v]
    assert mqa.block.parallel and mqa.block.mlp_norm is None and mqa.block.mlp.intermediate_size == 96
    assert mqa.block.mlp.activation == "gelu" and mqa.attention.position.theta == 500.0
    grouped, one_norm = irs["grouped"], irs["grouped-one-norm"]
    assert grouped.attention.num_kv_heads == 2 and grouped.attention.qkv_layout == "fused_per_kv_group"
    assert grouped.block.parallel and grouped.block.mlp_norm.eps == 1e-2
    assert grouped.tensor_shapes()["layers.0.attn.qkv.weight"] == ((4 + 2 * 2) * 16, 64)
    assert one_norm.block.parallel and one_norm.block.mlp_norm is None and one_norm.attention.position.scaled


@pytest.mark.parametrize("layout,key,value", [
    ("classic-alibi", "layer_norm_epsilon", 0.5), ("classic-alibi", "alibi", False),
    ("classic-rope", "rope_parameters", {"rope_type": "default", "rope_theta": 10000.0}),
    ("classic-rope", "activation", "gelu"), ("multi-query", "parallel_attn", False)])
def test_quirks_move_the_logits(ckpt_root, tmp_path, layout, key, value):
    """The same weights read with one quirk changed give other logits, so parity above checks that quirk."""
    directory = checkpoint(ckpt_root, layout)
    changed = edited(directory, tmp_path, **{key: value})
    if key == "parallel_attn":  # the sequential block's second norm: the same tensor renamed
        rename_norms(changed)
    mask = np.ones((1, 6), dtype=bool)
    step = Step(np.array([[1, 5, 9, 44, 21, 7]]), np.arange(6)[None], mask)
    before = polylm.load(directory, backend="torch").runtime.forward(step)
    after = polylm.load(changed, backend="torch").runtime.forward(step)
    assert np.abs(before - after).max() > 1e-3


def edited(directory, tmp_path, **changes):
    """A copy of checkpoint `directory` with config.json's `changes`."""
    changed = tmp_path / "changed"
    shutil.copytree(directory, changed)
    config = json.loads((changed / "config.json").read_text())
    (changed / "config.json").write_text(json.dumps({**config, **changes}))
    return changed


def rename_norms(directory):
    """Give each layer of a one-norm parallel checkpoint a post_attention_layernorm (a copy of its input norm)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(directory / "model.safetensors")
    for key in [k for k in tensors if ".input_layernorm." in k]:
        tensors[key.replace("input_layernorm", "post_attention_layernorm")] = tensors[key].clone()
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})


def test_new_architecture_without_parallel_attention_is_declined(ckpt_root, tmp_path):
    directory = edited(checkpoint(ckpt_root, "grouped"), tmp_path, parallel_attn=False)
    with pytest.raises(ConfigError) as error:
        polylm.load(directory, backend="torch")
    message = str(error.value)
    assert message.startswith(f"{directory / 'config.json'}: every family claiming model_type 'falcon' declined")
    assert "parallel_attn" in message


def test_fused_rows_per_kv_group_become_q_k_v():
    """Rows [kv_heads, group + 2, head_dim] (head_dim 1 here): each group's queries, its key, its value."""
    grouped = Attention(4, 2, 1, None, qkv_layout="fused_per_kv_group")  # stored q0 q1 k0 v0 q2 q3 k1 v1
    assert qkv_row_order(grouped).tolist() == [0, 1, 4, 5, 2, 6, 3, 7]
    per_head = Attention(2, 2, 2, None, qkv_layout="fused_per_kv_group")  # BLOOM: q0 k0 v0 q1 k1 v1, 2 dims each
    assert qkv_row_order(per_head).tolist() == [0, 1, 6, 7, 2, 3, 8, 9, 4, 5, 10, 11]
    assert qkv_row_order(Attention(2, 1, 2, None)) is None


def test_scaled_alibi_slopes():
    """Falcon's ALiBi bias is added before the softmax scale: its slopes carry the scale (head_dim 16: 1/4)."""
    plain = alibi_slopes(Attention(4, 4, 16, ALiBi()))
    assert plain.tolist() == [0.25, 0.0625, 0.015625, 0.00390625]
    assert (alibi_slopes(Attention(4, 4, 16, ALiBi(scaled=True))) == plain / 4).all()


def test_tensor_parallel_plan_of_kv_groups(ckpt_root):
    ir = model_ir(checkpoint(ckpt_root, "grouped"))
    plan = plan_shards(ir, Shard(1, 2))  # rank 1 holds the second group: 2 queries, a key and a value of 16 rows
    assert plan.part("layers.0.attn.qkv.weight") == TensorSlice(0, 64, 128) == plan.part("layers.1.attn.qkv.bias")
    local = plan.local_ir.attention
    assert (local.num_heads, local.num_kv_heads, local.qkv_layout) == (2, 1, "fused_per_kv_group")
    with pytest.raises(ParallelError, match="2 key/value groups"):
        plan_shards(ir, Shard(0, 4))


def test_two_ranks_match_one_process(ckpt_root, tmp_path):
    """Key/value groups split over the ranks (fused rows, one group each) and one key/value head both ranks keep
    (stacked rows, ALiBi slopes of each rank's heads)."""
    from polylm_torch_common.parallel import param_bytes

    cases = {layout: str(checkpoint(ckpt_root, layout)) for layout in ("grouped", "multi-query-alibi")}
    port = str(free_port())
    rank0, rank1 = run_two_ranks(WORKER, cases, tmp_path, lambda r: dict(
        RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
    for layout, directory in cases.items():
        single = polylm.load(directory, backend="torch")
        assert_matches_one_process(rank0[layout], single)
        whole = param_bytes(single.runtime.params)
        assert all(r[layout]["held_bytes"] < 0.75 * whole for r in (rank0, rank1))
