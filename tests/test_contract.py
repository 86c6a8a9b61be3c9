"""The backend contract's core pieces, written once: the cache record and its step check, the attention
visibility rule (against the rule torch wrote on its own before), reading a rank's slice of a tensor from the
validated header (against safetensors), the refusal of unsupported combinations on every backend, the
framework-free tensor-parallel arithmetic, and the seams that keep backend names out of core."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import polylm
from polylm.backend import Cache, Step
from polylm.checkpoint.slices import TensorFiles
from polylm.checkpoint.weights import read_header
from polylm.errors import BackendError, InputError, WeightsError
from polylm.ir import ALiBi, Attention, RoPE
from polylm.loading.registry import Registry, registry
from polylm.numerics.masks import attention_bias
from polylm.numerics.positions import alibi_slopes
from polylm.parallel.plan import Shard, TensorSlice, gather_padding, plan_shards, trim_gathered

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def step(batch, past, new, seed=0):
    """A random padded step: each row's real slots at random places, positions counting them."""
    rng = np.random.default_rng(seed)
    mask = rng.random((batch, past + new)) < 0.7
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    return Step(rng.integers(0, 50, (batch, new)), positions, mask)


# -- the cache record ----------------------------------------------------------------------------------------

def test_cache_admits_a_step_that_continues_it_and_names_the_numbers_otherwise():
    cache = Cache([], [], batch=2, capacity=10, length=4)
    assert cache.admit(step(2, 4, 3)) == (4, 3)
    with pytest.raises(InputError, match="step covers 8 slots, cache holds 4 of 10 and 3 are new"):
        cache.admit(Step(np.zeros((2, 3), int), np.zeros((2, 8), int), np.ones((2, 8), bool)))
    with pytest.raises(InputError, match="step covers 11 slots, cache holds 4 of 10 and 7 are new"):
        cache.admit(step(2, 4, 7))


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_runtimes_refuse_a_step_that_does_not_fit_their_cache(make_ckpt, backend):
    model = polylm.load(make_ckpt("helium"), backend=backend)
    cache = model.runtime.new_cache(1, 4)
    with pytest.raises(InputError, match="step covers 5 slots, cache holds 0 of 4 and 5 are new"):
        model.runtime.forward(step(1, 0, 5), cache)


# -- the visibility rule -------------------------------------------------------------------------------------

def torch_bias(attention, s, past, dtype, heads=slice(None)):
    """The rule the torch backend computed on its own before core's was the one (`StepTensors.attention_bias`)."""
    mask, positions = torch.from_numpy(s.mask), torch.from_numpy(s.positions)
    keys, new = mask.shape[1], s.input_ids.shape[1]
    causal = torch.arange(keys)[None, :] <= (past + torch.arange(new))[:, None]
    visible = (mask[:, None, :] & causal[None]).unsqueeze(1)
    if isinstance(attention.position, ALiBi):
        slopes = torch.from_numpy(alibi_slopes(attention)[heads].copy())
        distance = (positions[:, None, :] - positions[:, past:, None]).float()
        bias = slopes[None, :, None, None] * distance[:, None]
    else:
        bias = torch.zeros((), dtype=torch.float32)
    torch_dtype = TORCH_DTYPES[dtype]
    return torch.where(visible, bias, torch.finfo(torch_dtype).min).to(torch_dtype)


@pytest.mark.parametrize("position", [RoPE(10000.0, 256), ALiBi()])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("past,new", [(0, 9), (6, 1), (5, 4)])
def test_core_bias_is_the_rule_torch_wrote(position, dtype, past, new):
    attention = Attention(8, 2, 16, position)
    for seed in range(3):
        s = step(3, past, new, seed)
        expected = torch_bias(attention, s, past, dtype)
        got = torch.from_numpy(attention_bias(attention, s.positions, s.mask, past, dtype)).to(TORCH_DTYPES[dtype])
        assert torch.equal(got, expected)
        # a tensor-parallel rank's heads, and a key axis padded for a fixed window (MLX decode)
        rank = range(4, 8)
        sliced = attention_bias(attention, s.positions, s.mask, past, dtype, keys=past + new + 5, heads=rank)
        expected = torch_bias(attention, s, past, dtype, slice(4, 8))
        assert torch.equal(torch.from_numpy(sliced[..., :past + new]).to(TORCH_DTYPES[dtype]), expected)
        assert (sliced[..., past + new:] == np.float32(torch.finfo(TORCH_DTYPES[dtype]).min)).all()


# -- a rank's slice of a tensor ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """A safetensors file of 2-D and 3-D tensors in every float dtype, and its validated header."""
    generator = torch.Generator().manual_seed(0)
    tensors = {f"{dtype}.{rank}d": torch.randn(*shape, generator=generator).to(TORCH_DTYPES[dtype])
               for dtype in TORCH_DTYPES for rank, shape in ((2, (9, 13)), (3, (5, 6, 7)))}
    path = tmp_path_factory.mktemp("slices") / "model.safetensors"
    save_file(tensors, str(path))
    return tensors, read_header(path)


@pytest.mark.parametrize("dtype", list(TORCH_DTYPES))
@pytest.mark.parametrize("rank", [2, 3])
def test_slice_reader_reads_what_safetensors_reads(stored, dtype, rank):
    from safetensors import safe_open

    tensors, refs = stored
    key = f"{dtype}.{rank}d"
    with TensorFiles() as files, safe_open(str(refs[key].file), framework="pt") as reference:
        whole = files.read(refs[key])
        assert torch.equal(torch.from_numpy(whole).view(TORCH_DTYPES[dtype]), tensors[key])
        for dim in range(rank):
            size = tensors[key].shape[dim]
            for start, stop in ((0, size), (1, 4), (size // 2, size), (3, 3)):
                part = files.read(refs[key], TensorSlice(dim, start, stop))
                expected = reference.get_slice(key)[(slice(None),) * dim + (slice(start, stop),)]
                assert part.flags.c_contiguous and part.shape == tuple(expected.shape)
                assert torch.equal(torch.from_numpy(part).view(TORCH_DTYPES[dtype]), expected)


def test_slice_reader_names_a_truncated_file_and_a_slice_out_of_range(stored, tmp_path):
    _, refs = stored
    ref = refs["float32.2d"]
    with TensorFiles() as files, pytest.raises(WeightsError, match=r"no slice \[5, 14\) of dimension 1"):
        files.read(ref, TensorSlice(1, 5, 14))
    data = ref.file.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data)
    with open(cut, "r+b") as fh:
        fh.truncate(ref.offset + 8)
    from dataclasses import replace

    with TensorFiles() as files, pytest.raises(WeightsError, match="'float32.2d' is cut short"):
        files.read(replace(ref, file=cut), TensorSlice(0, 2, 5))


# -- combinations refused once, in core ------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", "mlx", "triton"])
def test_quantized_tensor_parallel_is_refused_before_anything_runs(make_ckpt, backend, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(BackendError) as error:
        polylm.load(make_ckpt("helium"), backend=backend, quantize="int8", tensor_parallel=2)
    assert str(error.value) == ("weight-only quantization (quantize='int8', --quantize) does not run "
                                "tensor-parallel (tensor_parallel=2, --tp) yet; drop one of them")


# -- tensor-parallel arithmetic --------------------------------------------------------------------------------

def test_vocab_rows_and_padded_gather_cover_every_id_and_column_once(make_ckpt):
    from polylm.loading import model_ir

    from dataclasses import replace

    ir = model_ir(make_ckpt("helium"))
    ir = replace(ir, embedding=replace(ir.embedding, vocab_size=322), head=replace(ir.head, out_features=322))
    plans = [plan_shards(ir, Shard(rank, 4)) for rank in range(4)]
    assert len(set(plans[0].head_sizes)) == 2  # uneven shares
    ids = np.array([[0, 1, ir.embedding.vocab_size - 1], [len(plans[0].vocab), 5, len(plans[0].vocab) - 1]])
    seen = np.zeros(ids.shape, int)
    for plan in plans:
        rows, inside = plan.vocab_rows(ids)
        assert ((rows >= 0) & (rows < len(plan.vocab))).all()
        assert (rows[inside] + plan.vocab.start == ids[inside]).all()
        seen += inside
    assert (seen == 1).all()
    sizes = plans[0].head_sizes
    logits = np.arange(2 * sum(sizes)).reshape(2, -1)
    shares = np.split(logits, np.cumsum(sizes)[:-1], axis=-1)
    padded = [np.pad(share, ((0, 0), (0, gather_padding(share.shape[-1], sizes)))) for share in shares]
    assert len({p.shape for p in padded}) == 1
    assert (np.concatenate(trim_gathered(padded, sizes), axis=-1) == logits).all()


def test_held_bytes_count_the_plans_slices(make_ckpt):
    from polylm.loading import model_ir

    ir = model_ir(make_ckpt("bloom"))
    whole = sum(int(np.prod(shape)) for shape in ir.tensor_shapes().values())
    held = [plan_shards(ir, Shard(rank, 2)).held_elements() for rank in range(2)]
    replicated = sum(int(np.prod(shape)) for name, shape in ir.tensor_shapes().items() if "norm" in name)
    biases = sum(int(np.prod(shape)) for name, shape in ir.tensor_shapes().items()
                 if name.endswith(("attn.o.bias", "mlp.down.bias")))
    assert sum(held) == whole + replicated  # every slice once, the norms on both ranks
    assert held[0] - held[1] == biases  # the row-parallel biases, added once, on rank 0


# -- backend names stay out of core --------------------------------------------------------------------------

def test_mlx_rank_comes_from_its_launcher_through_the_backend(tmp_path, monkeypatch):
    from polylm.parallel.launch import rank_env

    mlx = registry().backends["mlx"][0]
    for name in ("RANK", "WORLD_SIZE", "MLX_RANK", "MLX_HOSTFILE", "MLX_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert rank_env(mlx) is None and registry().backends["torch"][0].launch_env(2) is None
    envs = mlx.launch_env(3)
    hosts = json.loads(open(envs[0]["MLX_HOSTFILE"]).read())
    assert [e["MLX_RANK"] for e in envs] == ["0", "1", "2"] and len(hosts) == 3
    monkeypatch.setenv("MLX_RANK", "2")
    monkeypatch.setenv("MLX_HOSTFILE", envs[0]["MLX_HOSTFILE"])
    env = rank_env(mlx)
    assert (env.rank, env.world_size) == (2, 3)
    assert rank_env(registry().backends["torch"][0]) is None  # torch reads torchrun's variables only


def test_backend_help_and_no_backend_error_come_from_the_registry():
    help_text = subprocess.run([sys.executable, "-m", "polylm", "run", "--help"], capture_output=True,
                               text=True).stdout
    assert "auto (default), " + ", ".join(registry().names()) in " ".join(help_text.split())
    with pytest.raises(BackendError, match="no backend is available: none is installed"):
        Registry([]).backend("auto")
