"""Gemma 3 (text) against transformers: every task head on every backend (fp32, padded on both sides, greedy ids),
with local and global layers that differ in window and RoPE (mixed layer types), rings that wrap, and each quirk
set to a value that moves the logits; and two tensor-parallel ranks."""

from functools import cache

import pytest

import polylm
import polylm.backend
from polylm import testing
from polylm.errors import ConfigError, TaskError
from polylm.ir import TASKS
from polylm.loading import model_ir
from polylm.loading.registry import registry
from polylm.parallel.ranks import free_port
from test_heads import qa_reference, with_qa_head
from test_parity import BACKENDS, assert_parity
from test_tensor_parallel import WORKER, assert_matches_one_process, run_two_ranks

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256)
QUIRKS = dict(head_dim=24, sliding_window=4, layer_types=["sliding_attention", "sliding_attention", "full_attention"],
              rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0},
                               "sliding_attention": {"rope_type": "default", "rope_theta": 50.0}},
              query_pre_attn_scalar=20, rms_norm_eps=1e-2, hidden_activation="gelu")


@cache
def hf_has(task: str) -> bool:
    try:
        testing.tiny_model("gemma3_text", task, **SMALL)
    except TaskError:
        return False
    return True


def checkpoint(root, task: str):
    if hf_has(task):
        return testing.tiny_checkpoint(root, "gemma3_text", task, **SMALL, **QUIRKS), None
    base = testing.tiny_checkpoint(root, "gemma3_text", **SMALL, **QUIRKS)
    directory = with_qa_head(base, root / f"{base.name}-qa")
    return directory, qa_reference(directory)


def test_tasks_are_transformers_classes_and_question_answering():
    offered = registry().families["gemma3_text"][0].tasks
    assert set(offered) == {t for t in TASKS if hf_has(t)} | {"question-answering"}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("task", registry().families["gemma3_text"][0].tasks)
def test_matches_transformers(ckpt_root, monkeypatch, task, backend):
    monkeypatch.setattr(polylm.backend, "PASS_LIMIT", 3)  # rings of 6 slots: they wrap within every prompt
    directory, hf = checkpoint(ckpt_root, task)
    assert_parity(directory, task, backend, hf=hf)


def test_quirks_reach_the_ir(ckpt_root):
    ir = model_ir(checkpoint(ckpt_root, "causal-lm")[0])
    local, _, full = ir.layers
    assert (local.attention.window, full.attention.window) == (4, None)
    assert (local.attention.position.theta, full.attention.position.theta) == (50.0, 500.0)
    assert local.attention.position.scaling is None and full.attention.position.scaling.kind == "linear"
    assert ir.attention.scale == 20 ** -0.5 and ir.attention.qk_norm.scope == "head"
    assert ir.block.attn_post_norm.weight_offset == 1.0 and ir.embedding.scale == 64 ** 0.5


def test_legacy_rope_keys_and_the_default_pattern(tmp_path):
    import json
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "gemma3_text", "vocab_size": 320, **{**SMALL, "num_hidden_layers": 7}, "rope_theta": 1e5,
        "rope_local_base_freq": 20.0, "rope_scaling": {"rope_type": "linear", "factor": 8.0}}))
    ir = model_ir(tmp_path)
    assert [b.attention.window for b in ir.layers] == [4096] * 5 + [None] + [4096]  # one global layer in six
    assert [b.attention.position.theta for b in ir.layers[4:6]] == [20.0, 1e5]
    assert ir.layers[5].attention.position.scaling.factor == 8.0 and ir.layers[0].attention.position.scaling is None
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma3_text", "vocab_size": 320, **SMALL,
                                                      "use_bidirectional_attention": True}))
    with pytest.raises(ConfigError, match="use_bidirectional_attention=true"):
        model_ir(tmp_path)


def test_two_ranks_match_one_process(ckpt_root, tmp_path):
    """Layers that differ (window and RoPE), sandwich norms and per-head q/k norms, split over two ranks."""
    directory = checkpoint(ckpt_root, "causal-lm")[0]
    port = str(free_port())
    rank0, _ = run_two_ranks(WORKER, {"gemma3": str(directory)}, tmp_path, lambda r: dict(
        RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
    assert_matches_one_process(rank0["gemma3"], polylm.load(directory, backend="torch"))
