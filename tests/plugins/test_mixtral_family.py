"""Mixtral against transformers: every task head on every backend (fp32, padded on both sides, greedy ids), with
routing that differs from token to token, a sliding window, quantized experts, and two tensor-parallel ranks
splitting every expert."""

from functools import cache

import shutil

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import polylm
from polylm import testing
from polylm.errors import TaskError
from polylm.ir import QUANTIZATIONS, TASKS, MoE
from polylm.loading import model_ir
from polylm.loading.registry import registry
from polylm.numerics import quantization
from polylm.parallel.ranks import free_port
from polylm.testing.parity import SEQUENCES
import polylm_triton.experts
from polylm_torch_common.ops import ReferenceOps, route
from test_heads import qa_reference, with_qa_head
from test_parity import BACKENDS, assert_parity
from test_tensor_parallel import WORKER, assert_matches_one_process, run_two_ranks

SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256)
QUIRKS = dict(num_local_experts=6, num_experts_per_tok=2, sliding_window=5, rms_norm_eps=1e-2,
              rope_parameters={"rope_type": "default", "rope_theta": 100.0})


@cache
def hf_has(task: str) -> bool:
    try:
        testing.tiny_model("mixtral", task, **SMALL)
    except TaskError:
        return False
    return True


def checkpoint(root, task: str = "causal-lm"):
    if hf_has(task):
        return testing.tiny_checkpoint(root, "mixtral", task, **SMALL, **QUIRKS), None
    base = testing.tiny_checkpoint(root, "mixtral", **SMALL, **QUIRKS)
    directory = with_qa_head(base, root / f"{base.name}-qa")
    return directory, qa_reference(directory)


def test_tasks_are_transformers_classes_and_question_answering():
    assert set(registry().families["mixtral"][0].tasks) == {t for t in TASKS if hf_has(t)} | {"question-answering"}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("task", registry().families["mixtral"][0].tasks)
def test_matches_transformers(ckpt_root, task, backend):
    directory, hf = checkpoint(ckpt_root, task)
    assert_parity(directory, task, backend, hf=hf)


def test_routing_differs_from_token_to_token(ckpt_root):
    """The parity batch's tokens choose several expert sets in every layer, so a routing bug shows."""
    directory = checkpoint(ckpt_root)[0]
    ir = model_ir(directory)
    assert isinstance(ir.block.mlp, MoE) and ir.block.mlp.normalize and ir.block.mlp.num_experts == 6
    hf = testing.tiny_model("mixtral", **SMALL, **QUIRKS)  # the same seed: the checkpoint's weights
    chosen = []
    for layer in hf.model.layers:
        layer.mlp.gate.register_forward_hook(lambda module, args, out: chosen.append(out[2]))
    with torch.no_grad():
        hf(torch.tensor([SEQUENCES[0]]))
    assert len(chosen) == 2
    for picks in chosen:
        assert len({tuple(sorted(row)) for row in picks.tolist()}) >= 2
    weights, experts = route(torch.randn(5, 6), ir.block.mlp)
    assert torch.allclose(weights.sum(-1), torch.ones(5)) and experts.shape == (5, 2)


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_quantized_experts_are_the_core_numerics(ckpt_root, tmp_path, quantize):
    """Quantized experts (and attention, head, embedding) give the logits of the checkpoint whose matrices are
    replaced by their dequantized values (`polylm.numerics.quantization`): every expert is quantized, the router is
    not."""
    directory = checkpoint(ckpt_root)[0]
    shutil.copytree(directory, tmp_path, dirs_exist_ok=True)
    tensors = load_file(directory / "model.safetensors")
    for name, tensor in tensors.items():
        if tensor.ndim == 2 and not name.endswith("block_sparse_moe.gate.weight"):
            spec = QUANTIZATIONS[quantize]  # the embedding table by its own scheme (int8 for both presets)
            tensors[name] = quantization.quantize(tensor, spec.embedding if "embed" in name else spec).dequantize()
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ids = np.array([SEQUENCES[0]])
    quantized = polylm.load(directory, backend="torch", quantize=quantize).forward(ids)
    assert np.abs(quantized - polylm.load(tmp_path, backend="torch").forward(ids)).max() <= 1e-4


def test_triton_runs_the_grouped_expert_kernel(ckpt_root, monkeypatch):
    """The Triton backend's MoE layers go through its grouped matmul (two launches a layer: [gate; up], down),
    never the torch reference op, and give the torch backend's logits."""
    directory = checkpoint(ckpt_root)[0]
    ids = np.array([SEQUENCES[0]])
    expected = polylm.load(directory, backend="torch").forward(ids)
    launches = []
    grouped = polylm_triton.experts.grouped_linear
    monkeypatch.setattr(polylm_triton.experts, "grouped_linear", lambda *a, **k: launches.append(1) or grouped(*a, **k))
    monkeypatch.setattr(ReferenceOps, "routed_experts", None)  # calling the reference op would fail
    got = polylm.load(directory, backend="triton").forward(ids)
    assert len(launches) == 2 * 2  # two layers
    assert np.abs(got - expected).max() <= 1e-4


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_triton_quantized_experts_match_torch(ckpt_root, quantize):
    """Quantized expert stacks on Triton multiply with the torch backend's weights (the core numerics; only the
    order of float32 operations differs)."""
    directory = checkpoint(ckpt_root)[0]
    ids = np.array([SEQUENCES[0]])
    got = polylm.load(directory, backend="triton", quantize=quantize).forward(ids)
    assert np.abs(got - polylm.load(directory, backend="torch", quantize=quantize).forward(ids)).max() <= 1e-4


def test_two_ranks_match_one_process(ckpt_root, tmp_path):
    directory = checkpoint(ckpt_root)[0]
    port = str(free_port())
    rank0, _ = run_two_ranks(WORKER, {"mixtral": str(directory)}, tmp_path, lambda r: dict(
        RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
    assert_matches_one_process(rank0["mixtral"], polylm.load(directory, backend="torch"))
