"""The built-in GPT-2 family against transformers (parity per backend × task, fp32, padding on both sides,
greedy ids, with its quirks), the variants it declines, and the two core features it needs: learned absolute
positions and tensors stored otherwise than one per canonical name (`polylm.checkpoint.weights.Stored`:
stacked rows, transposed storage, candidate names), read whole or by tensor-parallel slices."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import polylm
from polylm import testing
from polylm.backend import Step
from polylm.checkpoint.slices import TensorFiles
from polylm.checkpoint.weights import Checkpoint, Stored, resolve
from polylm.errors import ConfigError, IRError, WeightsError
from polylm.ir import Embedding, LearnedPositions, Norm
from polylm.loading import model_ir
from polylm.parallel.plan import Shard, TensorSlice, plan_shards
from polylm.parallel.ranks import free_port
from polylm_gpt2 import FAMILY
from polylm_torch_common.params import TensorReader
from test_parity import BACKENDS, TASKS, assert_parity
from test_tensor_parallel import WORKER, assert_matches_one_process, run_two_ranks

DIMS = dict(n_embd=64, n_layer=2, n_head=4, vocab_size=320)
#: The causal-LM config (quirks away from their defaults; 24 positions hold the parity's longest prompt and the
#: 12 greedy tokens), an untied causal LM, and the config of every other task.
CONFIGS = {
    "causal-lm": dict(layer_norm_epsilon=1e-3, n_positions=24),
    "untied": dict(tie_word_embeddings=False, scale_attn_weights=False, activation_function="gelu", n_inner=96),
    "other": dict(scale_attn_weights=False, n_positions=64),
}


def checkpoint(root, task="causal-lm", variant=None, **overrides):
    config = CONFIGS[variant or ("causal-lm" if task == "causal-lm" else "other")]
    return testing.tiny_checkpoint(root, "gpt2", task, **{**DIMS, **config, **overrides})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("task", TASKS)
def test_matches_transformers(ckpt_root, task, backend):
    assert_parity(checkpoint(ckpt_root, task), task, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_untied_head_matches_transformers(ckpt_root, backend):
    assert_parity(checkpoint(ckpt_root, variant="untied"), "causal-lm", backend)


def test_quirks_reach_the_ir(ckpt_root):
    ir = model_ir(checkpoint(ckpt_root))
    assert ir.embedding.positions == LearnedPositions(24) and ir.max_positions == 24
    assert ir.attention.position is None and ir.attention.rotary_dim == 0
    assert ir.attention.softmax_scale == 16 ** -0.5 and ir.block.mlp_norm.eps == 1e-3
    assert ir.block.mlp.activation == "gelu_tanh" and ir.block.mlp.intermediate_size == 256
    assert ir.head.tied_to_embedding and ir.attention.qkv_bias and ir.attention.out_bias
    untied = model_ir(checkpoint(ckpt_root, variant="untied"))
    assert not untied.head.tied_to_embedding and untied.attention.softmax_scale == 1.0
    assert untied.block.mlp.activation == "gelu" and untied.block.mlp.intermediate_size == 96
    token = model_ir(checkpoint(ckpt_root, "token-classification"))
    assert token.head.bias and token.head.labels == ("neg", "neu", "pos")


@pytest.mark.parametrize("key,value", [("layer_norm_epsilon", 0.5), ("scale_attn_weights", True)])
def test_quirks_move_the_logits(ckpt_root, tmp_path, key, value):
    """The same weights read with one quirk changed give other logits, so parity above checks that quirk."""
    directory = checkpoint(ckpt_root, "sequence-classification")
    changed = tmp_path / "changed"
    shutil.copytree(directory, changed)
    config = json.loads((changed / "config.json").read_text())
    (changed / "config.json").write_text(json.dumps({**config, key: value}))
    step = plain_step([[1, 5, 9, 44, 21, 7]], [[True] * 6])
    before = polylm.load(directory, backend="torch").runtime.forward(step)
    after = polylm.load(changed, backend="torch").runtime.forward(step)
    assert np.abs(before - after).max() > 1e-4


@pytest.mark.parametrize("key", ["scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"])
def test_declined_variant_names_the_key(ckpt_root, key):
    directory = checkpoint(ckpt_root, "causal-lm", **{key: True})
    with pytest.raises(ConfigError) as error:
        polylm.load(directory, backend="torch")
    message = str(error.value)
    assert message.startswith(f"{directory / 'config.json'}: every family claiming model_type 'gpt2' declined")
    assert key in message


def test_learned_positions_follow_the_padding(ckpt_root):
    """A left-padded row's tokens take positions 0, 1, … from its first real token: its outputs equal the
    unpadded row's, and differ from those of the same tokens shifted to later positions."""
    model = polylm.load(checkpoint(ckpt_root, "token-classification"), backend="torch")
    ids = [1, 5, 9, 44]
    alone = model.runtime.forward(plain_step([ids], [[True] * 4]))[0]
    padded = model.runtime.forward(plain_step([[0, 0] + ids], [[False, False] + [True] * 4]))[0, 2:]
    shifted = model.runtime.forward(plain_step([[0, 0] + ids], [[True] * 6]))[0, 2:]
    assert np.abs(alone - padded).max() < 1e-5
    assert np.abs(alone - shifted).max() > 1e-3


def plain_step(ids, mask):
    """A prefill step with core's positions for `mask` (see `polylm.model`)."""
    mask = np.array(mask)
    return Step(np.array(ids), np.maximum(np.cumsum(mask, axis=1) - 1, 0), mask)


def test_learned_positions_in_the_ir():
    with pytest.raises(IRError, match="no embedding norm"):
        Embedding(320, 64, norm=Norm("layer", 1e-5), positions=LearnedPositions(16))
    with pytest.raises(IRError, match="max_position_embeddings"):
        LearnedPositions(0)


def test_context_longer_than_the_learned_positions_is_refused(ckpt_root):
    ir = model_ir(checkpoint(ckpt_root))
    with pytest.raises(IRError, match="24 learned position embeddings|learned position embeddings, got 24"):
        type(ir)(**{**ir.__dict__, "max_positions": 25})


# --- stored layouts, resolved by core and read by the readers -------------------------------------------------

STACKED = ("layers.{i}.a", "layers.{i}.b")
SHAPES = {"embed.weight": (5, 4), "layers.0.a.weight": (2, 4), "layers.0.b.weight": (3, 4),
          "layers.0.a.bias": (2,), "layers.0.b.bias": (3,), "layers.0.c.weight": (6, 4)}


def layouts_checkpoint(tmp_path, **extra):
    tensors = {"embed.weight": torch.arange(20.).reshape(5, 4), "fused.weight": torch.arange(100., 120.).reshape(4, 5),
               "fused.bias": torch.arange(5.), "new_c.weight": torch.arange(24.).reshape(6, 4), **extra}
    save_file(tensors, tmp_path / "model.safetensors")
    return Checkpoint(tmp_path), tensors


def layouts_resolve(ckpt, module_names, shapes=SHAPES):
    return resolve(ckpt, shapes, module_names, "lm_head", ("",), (), {})


FUSED = Stored("fused", stacked=STACKED, transposed=True)
NAMES = {"embed": "embed", "layers.{i}.a": FUSED, "layers.{i}.b": FUSED, "layers.{i}.c": Stored("old_c", "new_c")}


def test_stacked_transposed_rows_and_candidates_resolve_and_read(tmp_path):
    ckpt, stored = layouts_checkpoint(tmp_path)
    weights = layouts_resolve(ckpt, NAMES)
    a, b, c = weights["layers.0.a.weight"], weights["layers.0.b.weight"], weights["layers.0.c.weight"]
    assert (a.key, a.rows, a.transposed, a.shape, a.stored_shape) == ("fused.weight", (0, 2), True, (2, 4), (4, 5))
    assert (b.rows, b.shape) == ((2, 5), (3, 4))
    assert weights["layers.0.b.bias"].rows == (2, 5) and not weights["layers.0.b.bias"].transposed
    assert c.key == "new_c.weight" and c.plain
    fused = stored["fused.weight"].numpy()
    with TensorFiles() as files:
        np.testing.assert_array_equal(files.read(a), fused.T[:2])
        np.testing.assert_array_equal(files.read(b), fused.T[2:])
        np.testing.assert_array_equal(files.read(weights["layers.0.b.bias"]), [2., 3., 4.])
        np.testing.assert_array_equal(files.read(c), stored["new_c.weight"].numpy())
        # a tensor-parallel slice of a view: offsets add to the row range, dims swap for transposed storage
        np.testing.assert_array_equal(files.read(b, TensorSlice(0, 1, 3)), fused.T[3:5])
        np.testing.assert_array_equal(files.read(b, TensorSlice(1, 1, 3)), fused.T[2:, 1:3])
        out = torch.empty(3, 2)
        files.read(b, TensorSlice(1, 2, 4), out=out.view(-1).view(torch.uint8).numpy())
        np.testing.assert_array_equal(out.numpy(), fused.T[2:, 2:4])


def test_views_read_by_the_mlx_reader(tmp_path):
    import mlx.core as mx

    from polylm_mlx.params import read_tensors

    ckpt, stored = layouts_checkpoint(tmp_path)
    tensors = read_tensors(layouts_resolve(ckpt, NAMES), mx.float32)
    np.testing.assert_array_equal(np.array(tensors["layers.0.b.weight"]), stored["fused.weight"].numpy().T[2:])
    np.testing.assert_array_equal(np.array(tensors["layers.0.a.bias"]), [0., 1.])


def test_missing_candidates_are_all_named(tmp_path):
    ckpt, _ = layouts_checkpoint(tmp_path)
    names = {**NAMES, "layers.{i}.c": Stored("old_c", "other_c")}
    with pytest.raises(WeightsError, match="missing tensor 'old_c.weight' or 'other_c.weight' \\(for layers.0.c"):
        layouts_resolve(ckpt, names)


def test_view_shapes_are_checked(tmp_path):
    ckpt, _ = layouts_checkpoint(tmp_path)
    with pytest.raises(WeightsError, match="'fused.weight' transposed has shape \\[5, 4\\]; expected 6 rows"):
        layouts_resolve(ckpt, NAMES, {**SHAPES, "layers.0.b.weight": (4, 4), "layers.0.b.bias": (4,)})
    untransposed = {**NAMES, "layers.{i}.a": Stored("fused", stacked=STACKED)}
    untransposed["layers.{i}.b"] = untransposed["layers.{i}.a"]
    with pytest.raises(WeightsError, match="expected 5 rows stacking layers.0.a, layers.0.b"):
        layouts_resolve(ckpt, untransposed)


def test_leftover_check_knows_shared_tensors(tmp_path):
    """`fused` serves four canonical tensors and is no leftover; a candidate that lost to the first is one."""
    ckpt, _ = layouts_checkpoint(tmp_path, **{"old_c.weight": torch.zeros(6, 4)})
    with pytest.raises(WeightsError, match="unexpected tensor 'new_c.weight'"):
        layouts_resolve(ckpt, NAMES)
    weights = resolve(ckpt, SHAPES, NAMES, "lm_head", ("",), (r"^new_c\.",), {})
    assert weights["layers.0.c.weight"].key == "old_c.weight"  # the first candidate present wins
    assert {weights[name].key for name in SHAPES if ".a." in name or ".b." in name} == {"fused.weight",
                                                                                        "fused.bias"}


def test_tensor_parallel_slices_of_gpt2_views(ckpt_root):
    """Each of two ranks reads its slices of the stacked, transposed c_attn and the Conv1D matrices, and the
    whole replicated position table: the same numbers as the slices of the whole tensors."""
    directory = checkpoint(ckpt_root, "sequence-classification")
    ir = model_ir(directory)
    weights = resolve(Checkpoint(directory), ir.tensor_shapes(), FAMILY.module_names, "score",
                      FAMILY.base_prefixes, FAMILY.ignored_tensors, {})
    names = ("layers.1.attn.k.weight", "layers.1.attn.v.bias", "layers.0.attn.o.weight", "layers.0.mlp.up.weight",
             "layers.0.mlp.down.weight", "embed.positions.weight")
    with TensorReader(weights, torch.float32) as whole:
        tensors = {name: whole.tensor(name) for name in names}
    for rank in range(2):
        plan = plan_shards(ir, Shard(rank, 2))
        assert plan.part("layers.1.attn.k.weight") is not None and plan.part("embed.positions.weight") is None
        with TensorReader(weights, torch.float32, plan=plan) as part:
            for name in names:
                expected, piece = tensors[name], plan.part(name)
                if piece is not None:
                    expected = expected.narrow(piece.dim, piece.start, piece.stop - piece.start)
                torch.testing.assert_close(part.tensor(name), expected, rtol=0, atol=0)


def test_two_ranks_match_one_process(ckpt_root, tmp_path):
    """A vocab-parallel tied head, split stacked c_attn views and the replicated position table over two ranks."""
    from polylm_torch_common.parallel import param_bytes

    directory = checkpoint(ckpt_root, variant="other")
    port = str(free_port())
    rank0, rank1 = run_two_ranks(WORKER, {"gpt2": str(directory)}, tmp_path, lambda r: dict(
        RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
    single = polylm.load(directory, backend="torch")
    assert single.task == "causal-lm" and single.ir.head.tied_to_embedding
    assert_matches_one_process(rank0["gpt2"], single)
    whole = param_bytes(single.runtime.params)
    assert all(r["gpt2"]["held_bytes"] < 0.7 * whole for r in (rank0, rank1))
