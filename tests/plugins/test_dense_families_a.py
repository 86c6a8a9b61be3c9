"""The built-in llama, qwen2, qwen3, olmo2, granite and cohere families against transformers: every task head on
every backend (fp32, padded on both sides, greedy ids), causal LMs with each family's quirks set to values that
move the logits; cohere tensor-parallel; and the variants they decline or refuse, with the key named."""

import json
from functools import cache

import pytest

import polylm
from polylm import testing
from polylm.errors import ConfigError, ParallelError, TaskError
from polylm.ir import TASKS
from polylm.loading import model_ir
from polylm.loading.registry import registry
from polylm.parallel.ranks import free_port
from test_heads import qa_reference, with_qa_head
from test_parity import BACKENDS, assert_parity
from test_tensor_parallel import WORKER, assert_matches_one_process, run_two_ranks

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256)
ROPE_100 = {"rope_type": "default", "rope_theta": 100.0}
#: Causal-LM configs: each value differs from the family's default and moves the logits; Qwen2/Qwen3 window some
#: layers (mixed layer types), by max_window_layers and by layer_types.
QUIRKS = {
    "llama": dict(rope_parameters={"rope_type": "llama3", "factor": 8.0, "rope_theta": 500.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
                  attention_bias=True, mlp_bias=True, head_dim=24, tie_word_embeddings=True, rms_norm_eps=1e-2,
                  hidden_act="gelu"),
    "qwen2": dict(rope_parameters=ROPE_100, rms_norm_eps=1e-2, tie_word_embeddings=True,
                  use_sliding_window=True, sliding_window=4, max_window_layers=1),
    "qwen3": dict(rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 100.0}, rms_norm_eps=1e-2,
                  head_dim=24, attention_bias=True, use_sliding_window=True, sliding_window=3, max_window_layers=2,
                  layer_types=["sliding_attention", "full_attention"]),
    "olmo2": dict(rope_parameters=ROPE_100, rms_norm_eps=1e-2, attention_bias=True, hidden_act="relu"),
    "granite": dict(embedding_multiplier=3.0, attention_multiplier=0.05, residual_multiplier=0.4, logits_scaling=3.0,
                    attention_bias=True, mlp_bias=True),
    "cohere": dict(rope_parameters=ROPE_100, layer_norm_eps=1e-2, use_qk_norm=True, logit_scale=0.5,
                   attention_bias=True),
}
FAMILIES = tuple(QUIRKS)


@cache
def hf_has(family: str, task: str) -> bool:
    """Whether transformers has an `AutoModelFor<task>` class for this model type."""
    try:
        testing.tiny_model(family, task, **SMALL)
    except TaskError:
        return False
    return True


def checkpoint(root, family: str, task: str):
    """(directory, reference model or None for transformers' own class) of `family` for `task`."""
    if task == "causal-lm":
        return testing.tiny_checkpoint(root, family, **SMALL, **QUIRKS[family]), None
    if hf_has(family, task):
        return testing.tiny_checkpoint(root, family, task, **SMALL), None
    base = testing.tiny_checkpoint(root, family, **SMALL)
    directory = with_qa_head(base, root / f"{base.name}-qa")
    return directory, qa_reference(directory)


CASES = [(f, t) for f in FAMILIES for t in registry().families[f][0].tasks]


@pytest.mark.parametrize("family", FAMILIES)
def test_tasks_are_transformers_classes_and_question_answering(family):
    offered = registry().families[family][0].tasks
    assert set(offered) == {t for t in TASKS if hf_has(family, t)} | {"question-answering"}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family,task", CASES)
def test_matches_transformers(ckpt_root, family, task, backend):
    directory, hf = checkpoint(ckpt_root, family, task)
    assert model_ir(directory).family == family
    assert_parity(directory, task, backend, hf=hf)


def test_quirks_reach_the_ir(ckpt_root):
    def ir(family, task="causal-lm"):
        return model_ir(checkpoint(ckpt_root, family, task)[0], task=task)

    granite, cohere, olmo2 = ir("granite"), ir("cohere"), ir("olmo2")
    assert (granite.embedding.scale, granite.attention.scale, granite.block.residual_scale) == (3.0, 0.05, 0.4)
    assert granite.head.logit_scale == 1 / 3.0 and ir("granite", "question-answering").head.logit_scale == 1.0
    assert cohere.block.parallel and cohere.block.mlp_norm is None and cohere.head.tied_to_embedding
    assert cohere.attention.qk_norm.scope == "head_each" and cohere.attention.position.interleaved
    assert cohere.head.logit_scale == 0.5 and ir("cohere", "question-answering").attention.qk_norm is None
    assert olmo2.block.attn_norm is None and olmo2.block.mlp_norm is None
    assert olmo2.block.attn_post_norm == olmo2.block.mlp_post_norm == olmo2.final_norm
    assert olmo2.attention.qk_norm.scope == "projection"
    assert ir("qwen3").attention.qk_norm.scope == "head" and ir("llama").attention.position.scaling.kind == "llama3"
    assert [block.attention.window for block in ir("qwen2").layers] == [None, 4]
    assert [block.attention.window for block in ir("qwen3").layers] == [3, None]


def write_config(directory, family: str, **config):
    (directory / "config.json").write_text(json.dumps({"model_type": family, "vocab_size": 320, **SMALL, **config}))
    return directory


def test_head_dim_defaults_as_transformers(tmp_path):
    assert model_ir(write_config(tmp_path, "qwen3")).attention.head_dim == 128  # Qwen3Config's default
    assert model_ir(write_config(tmp_path, "llama")).attention.head_dim == 16  # hidden / heads


@pytest.mark.parametrize("family,window,windows", [
    ("qwen2", dict(use_sliding_window=True, sliding_window=64, max_window_layers=1), (None, 64)),
    ("qwen3", dict(use_sliding_window=True, sliding_window=64, layer_types=["full_attention", "sliding_attention"]),
     (None, 64)),
    ("qwen2", dict(use_sliding_window=True, sliding_window=64, max_window_layers=2), (None, None)),  # none from 2 on
    ("qwen3", dict(use_sliding_window=True, sliding_window=64), (None, None)),  # max_window_layers 28 by default
    ("qwen2", dict(use_sliding_window=True, max_window_layers=0), (4096, 4096)),  # sliding_window's default
    ("qwen3", dict(use_sliding_window=False, sliding_window=64, layer_types=["sliding_attention"] * 2), (None, None)),
])
def test_sliding_windows_are_where_transformers_puts_them(tmp_path, family, window, windows):
    ir = model_ir(write_config(tmp_path, family, **window))
    assert tuple(block.attention.window for block in ir.layers) == windows


def test_layer_types_of_another_kind_are_refused_naming_the_key(tmp_path):
    path = write_config(tmp_path, "qwen2", use_sliding_window=True, sliding_window=8,
                        layer_types=["full_attention", "chunked_attention"]) / "config.json"
    with pytest.raises(ConfigError, match=f"{path}: key 'layer_types' has 'chunked_attention'; supported: "
                                          "full_attention, sliding_attention"):
        model_ir(tmp_path)


def test_olmo2_refuses_tensor_parallel_naming_its_qk_norm(ckpt_root):
    with pytest.raises(ParallelError, match=r"over 2 ranks does not split a query/key norm over the whole "
                                            r"projection \(OLMo-2's q_norm/k_norm\)"):
        polylm.load(checkpoint(ckpt_root, "olmo2", "causal-lm")[0], backend="torch", tensor_parallel=2)


def test_cohere_two_ranks_match_one_process(ckpt_root, tmp_path):
    """Parallel residual with a shared norm and per-head q/k norms ([heads, head_dim] rows split by head)."""
    from polylm_torch_common.parallel import param_bytes

    directory = checkpoint(ckpt_root, "cohere", "causal-lm")[0]
    port = str(free_port())
    rank0, rank1 = run_two_ranks(WORKER, {"cohere": str(directory)}, tmp_path, lambda r: dict(
        RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
    single = polylm.load(directory, backend="torch")
    assert_matches_one_process(rank0["cohere"], single)
    whole = param_bytes(single.runtime.params)
    assert all(result["cohere"]["held_bytes"] < 0.6 * whole for result in (rank0, rank1))
