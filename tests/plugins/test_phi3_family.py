"""The built-in Phi-3 family against transformers (parity per backend × task, fp32, padding on both sides, greedy
ids, with its quirks: stacked qkv_proj / gate_up_proj, partial RoPE, a tied head), LongRoPE (its factors chosen
per row by length, on both sides of original_max_position_embeddings; its config forms and checks), the variants
it declines; and Phi's tied lm_head, which keeps its own bias."""


import numpy as np
import pytest
import torch
import transformers

import polylm
from polylm import testing
from polylm.checkpoint.weights import Checkpoint, resolve
from polylm.errors import ConfigError, IRError
from polylm.ir import Attention, RoPE, RopeScaling
from polylm.loading import model_ir
from polylm.loading.registry import registry
from polylm.numerics.positions import rope_frequencies_per_row
from polylm.parallel.plan import Shard, TensorSlice, plan_shards
from polylm.testing import SEQUENCES, max_diff_padded
from polylm_torch_common.params import TensorReader
from checkpoints import edited
from test_heads import qa_reference, with_qa_head
from test_parity import BACKENDS, TOLERANCE, assert_parity

DIMS = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)
SHORT = [1.0, 1.5, 2.0, 0.7, 1.1, 3.0]  # one factor per rotary pair: 16 × 0.75 rotary dims / 2
LONG = [2.0, 4.0, 8.0, 1.3, 5.5, 9.0]
LONGROPE = dict(rope_type="longrope", short_factor=SHORT, long_factor=LONG, rope_theta=500.0,
                partial_rotary_factor=0.75)
#: The causal-LM config (quirks away from their defaults; LongRoPE switching at 16 tokens, a tied head, a window
#: that never applies) and the config of every other task (a window shorter than the prompts).
CONFIGS = {
    "causal-lm": dict(num_key_value_heads=2, rope_parameters=LONGROPE, original_max_position_embeddings=16,
                      max_position_embeddings=64, sliding_window=64, rms_norm_eps=1e-3, tie_word_embeddings=True),
    "other": dict(num_key_value_heads=4, hidden_act="gelu_pytorch_tanh", rope_theta=100.0, rms_norm_eps=1e-4,
                  max_position_embeddings=64, sliding_window=5),
}
#: Rows on both sides of original_max_position_embeddings (16) in one batch: each takes its own factors.
MIXED = [list(range(3, 23)), [1, 5, 9, 44, 21, 7, 100, 3, 250], list(range(40, 57)), list(range(60, 76))]


def checkpoint(root, task="causal-lm", *, like=None, **overrides):
    config = CONFIGS["causal-lm" if (like or task) == "causal-lm" else "other"]
    return testing.tiny_checkpoint(root, "phi3", task, **{**DIMS, **config, **overrides})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("task", ["sequence-classification", "token-classification", "question-answering"])
def test_matches_transformers(ckpt_root, task, backend):
    if task == "question-answering":  # transformers has no Phi3ForQuestionAnswering: base model + qa_outputs
        base = checkpoint(ckpt_root, like=task)
        directory = with_qa_head(base, ckpt_root / f"{base.name}-qa")
        assert_parity(directory, task, backend, hf=qa_reference(directory))
    else:
        assert_parity(checkpoint(ckpt_root, task), task, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_longrope_causal_lm_matches_transformers(ckpt_root, backend):
    """Padded batches of short rows (`testing.SEQUENCES`) and of rows on both sides of the switch; the greedy ids
    of a batch of a prompt that stays short (4 + 12 tokens) and one that starts long (transformers recomputes
    each step, alone)."""
    directory = checkpoint(ckpt_root)
    hf = hf_causal_lm(directory)
    report = testing.check_parity(directory, backends=[backend], prompts=(SEQUENCES[1], MIXED[2]), hf=hf)
    assert report.unavailable == {} and max(report.max_diff[backend].values()) <= TOLERANCE
    assert report.greedy[backend] == report.reference_greedy and list(map(len, report.reference_greedy)) == [12, 12]
    model = polylm.load(directory, backend=backend)
    for side in ("left", "right"):
        assert max_diff_padded(model, hf, "causal-lm", side, MIXED) <= TOLERANCE


def hf_causal_lm(directory):
    return transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def test_quirks_reach_the_ir(ckpt_root):
    ir = model_ir(checkpoint(ckpt_root))
    attn, scaling = ir.attention, ir.attention.position.scaling
    assert (attn.num_kv_heads, attn.rotary_dim, attn.position.theta) == (2, 12, 500.0)
    assert not (attn.qkv_bias or attn.out_bias or ir.block.mlp.bias) and attn.window == 64
    assert ir.head.tied_to_embedding and ir.final_norm.eps == 1e-3 and ir.max_positions == 64
    assert (scaling.kind, scaling.original_max_positions, scaling.factor) == ("longrope", 16, 4.0)
    assert scaling.short_factor == tuple(SHORT) and scaling.long_factor == tuple(LONG)
    other = model_ir(checkpoint(ckpt_root, "token-classification"))
    assert other.block.mlp.activation == "gelu_tanh" and other.attention.position.scaling is None
    assert other.head.bias and other.attention.rotary_dim == 16 and other.attention.window == 5


def test_longrope_frequencies_per_row(ckpt_root):
    """The default attention factor √(1 + ln 4 / ln 16); short factors up to 16 positions, long past them, per row;
    one row when every row takes the same."""
    attn = model_ir(checkpoint(ckpt_root)).attention
    base = 500.0 ** (np.arange(0, 12, 2) / 12)
    short, factor = rope_frequencies_per_row(attn, np.array([[0, 15], [3, 4]]))
    assert short.shape == (1, 6) and factor == pytest.approx(1.5 ** 0.5)
    np.testing.assert_allclose(short[0], 1 / (np.array(SHORT) * base), rtol=1e-6)
    mixed, _ = rope_frequencies_per_row(attn, np.array([[0, 16], [0, 15]]))
    np.testing.assert_allclose(mixed, 1 / (np.array([LONG, SHORT]) * base), rtol=1e-6)


def legacy_su(config):
    """The Phi-3-mini-128k form: factors in `rope_scaling` with the old type name, theta and fraction at the top."""
    params = config.pop("rope_parameters")
    return {**config, "rope_theta": params["rope_theta"], "partial_rotary_factor": params["partial_rotary_factor"],
            "rope_scaling": {"type": "su", "short_factor": SHORT, "long_factor": LONG}}


def test_legacy_forms_read_the_same(ckpt_root, tmp_path):
    directory = checkpoint(ckpt_root)
    assert model_ir(edited(directory, tmp_path, legacy_su)) == model_ir(directory)


@pytest.mark.parametrize("scaling", [dict(attention_factor=0.8), dict(factor=2.0)])
def test_explicit_attention_factor_and_factor_match_transformers(ckpt_root, scaling):
    directory = checkpoint(ckpt_root, rope_parameters={**LONGROPE, **scaling})
    hf, model = hf_causal_lm(directory), polylm.load(directory, backend="torch")
    for side in ("left", "right"):
        assert max_diff_padded(model, hf, "causal-lm", side, MIXED) <= TOLERANCE


@pytest.mark.parametrize("edit", [
    lambda c: {**c, "rms_norm_eps": 0.5},
    lambda c: {**c, "rope_parameters": {**c["rope_parameters"], "long_factor": SHORT}},
    lambda c: {**c, "rope_parameters": {**c["rope_parameters"], "attention_factor": 1.0}},
], ids=["rms_norm_eps", "long_factor", "attention_factor"])
def test_quirks_move_the_logits(ckpt_root, tmp_path, edit):
    """The same weights read with one quirk changed give other logits (on a long row), so parity checks it."""
    directory = checkpoint(ckpt_root)
    ids = np.array([MIXED[0]])
    before = polylm.load(directory, backend="torch").forward(ids)
    after = polylm.load(edited(directory, tmp_path, edit), backend="torch").forward(ids)
    assert np.abs(before - after).max() > 1e-3


@pytest.mark.parametrize("edit,key", [
    (lambda c: {**c, "rope_parameters": {**c["rope_parameters"], "rope_type": "yarn"}}, "'yarn'"),
], ids=["yarn"])
def test_declined_variant_names_the_key(ckpt_root, tmp_path, edit, key):
    directory = edited(checkpoint(ckpt_root), tmp_path, edit)
    with pytest.raises(ConfigError) as error:
        polylm.load(directory, backend="torch")
    message = str(error.value)
    assert message.startswith(f"{directory / 'config.json'}: every family claiming model_type 'phi3' declined")
    assert key in message


@pytest.mark.parametrize("scaling,message", [
    (dict(short_factor=SHORT[:5]), "short_factor has 5 values; .* needs one per rotary pair: 6"),
    (dict(long_factor=LONG[:5] + [0.0]), "long_factor must be a list of positive numbers"),
    (dict(long_factor=LONG[:5] + ["x"]), "long_factor must be a list of positive numbers"),
    (dict(attention_factor=-1.0), "attention_factor must be a positive number"),
])
def test_bad_longrope_values_are_refused_naming_the_key(ckpt_root, tmp_path, scaling, message):
    directory = edited(checkpoint(ckpt_root), tmp_path,
                       lambda c: {**c, "rope_parameters": {**c["rope_parameters"], **scaling}})
    with pytest.raises(IRError, match=f"config.json.*{message}"):
        model_ir(directory)


def test_longrope_needs_an_original_context():
    with pytest.raises(IRError, match="original_max_position_embeddings ≥ 2"):
        RopeScaling("longrope", short_factor=(1.0,), long_factor=(1.0,))
    scaling = RopeScaling("longrope", 1.0, 8, short_factor=(1.0,), long_factor=(2.0,))
    with pytest.raises(IRError, match="short_factor has 1 values"):
        Attention(2, 2, 8, RoPE(100.0, 16, scaling=scaling))


# --- Phi's tied lm_head keeps its bias ------------------------------------------------------------------------

PHI_TIED = dict(DIMS, max_position_embeddings=64, partial_rotary_factor=0.5, tie_word_embeddings=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tied_phi_head_with_bias_matches_transformers(ckpt_root, backend):
    directory = testing.tiny_checkpoint(ckpt_root, "phi", **PHI_TIED)
    ir = model_ir(directory)
    assert ir.head.tied_to_embedding and ir.head.bias and "head.weight" not in ir.tensor_shapes()
    assert_parity(directory, "causal-lm", backend)


def test_tied_phi_head_bias_is_split_with_the_vocabulary(ckpt_root):
    """Over two ranks each reads its vocabulary rows of the embedding (the tied head) and of the head's bias."""
    directory = testing.tiny_checkpoint(ckpt_root, "phi", **PHI_TIED)
    ir = model_ir(directory)
    weights = resolve(Checkpoint(directory), ir.tensor_shapes(), registry().family("phi").module_names, "lm_head",
                      ("model.",), (), {})
    with TensorReader(weights, torch.float32) as whole:
        bias = whole.tensor("head.bias")
    for rank, rows in enumerate([(0, 160), (160, 320)]):
        plan = plan_shards(ir, Shard(rank, 2))
        assert plan.part("head.bias") == TensorSlice(0, *rows) == plan.part("embed.weight")
        with TensorReader(weights, torch.float32, plan=plan) as part:
            assert (part.tensor("head.bias") == bias[rows[0]:rows[1]]).all()
