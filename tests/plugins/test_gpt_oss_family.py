"""gpt-oss against transformers: every task head (QA through the base model and `qa_outputs`) on torch and Triton
(fp32, padded on both sides, greedy ids), with attention sinks, sliding-window layers whose rings wrap, YaRN,
clamped SwiGLU experts that bite, routing that differs per token; and the interleaved, transposed expert stack
read whole, by tensor-parallel slices and by MLX; and two tensor-parallel ranks (torch, MLX) equal to one process."""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file

import polylm
import polylm.backend
import polylm_gpt_oss
from polylm import testing
from polylm.checkpoint.weights import Checkpoint, resolve
from polylm.loading import model_ir
from polylm.parallel.plan import Shard, TensorSlice, plan_shards
from polylm.parallel.ranks import free_port
from polylm.testing import SEQUENCES
from polylm_torch_common.params import TensorReader
from test_heads import qa_reference, with_qa_head
from test_parity import BACKENDS, assert_parity
from test_tensor_parallel import WORKER, assert_matches_one_process, run_two_ranks
from test_tensor_parallel_mlx import run_two_mlx_ranks

CONFIG = dict(hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              head_dim=16, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=256,
              sliding_window=4, swiglu_limit=1.5, rms_norm_eps=1e-3,
              rope_parameters=dict(rope_type="yarn", rope_theta=500.0, factor=4.0,
                                   original_max_position_embeddings=64, beta_fast=8.0, beta_slow=1.0,
                                   truncate=False))
HF_TASKS = ("causal-lm", "sequence-classification", "token-classification")


def checkpoint(root: Path, task: str = "causal-lm", **overrides) -> tuple[Path, object]:
    if task in HF_TASKS:
        return testing.tiny_checkpoint(root, "gpt_oss", task, **{**CONFIG, **overrides}), None
    base = testing.tiny_checkpoint(root, "gpt_oss", **CONFIG)
    directory = with_qa_head(base, root / f"{base.name}-qa")
    return directory, qa_reference(directory)


def test_tasks_and_quirks_reach_the_ir(ckpt_root):
    assert set(polylm_gpt_oss.FAMILY.tasks) == {*HF_TASKS, "question-answering"}
    with pytest.raises(ValueError):
        transformers.AutoModelForQuestionAnswering.from_config(transformers.GptOssConfig(**CONFIG))
    ir = model_ir(checkpoint(ckpt_root)[0])
    local, full = ir.layers
    assert (local.attention.window, full.attention.window) == (4, None)
    assert ir.attention.sinks and ir.attention.qkv_bias and ir.attention.out_bias
    assert ir.attention.position.scaling.kind == "yarn" and not ir.attention.position.scaling.truncate
    moe = ir.block.mlp
    assert (moe.num_experts, moe.top_k, moe.routing, moe.router_bias) == (4, 2, "topk_softmax", True)
    assert (moe.expert.activation, moe.expert.limit, moe.expert.alpha, moe.expert.bias) == ("swiglu_oai", 1.5,
                                                                                            1.702, True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("task", polylm_gpt_oss.FAMILY.tasks)
def test_matches_transformers(ckpt_root, monkeypatch, task, backend):
    monkeypatch.setattr(polylm.backend, "PASS_LIMIT", 3)  # rings of 4 + 3 slots: they wrap within every prompt
    directory, hf = checkpoint(ckpt_root, task)
    assert_parity(directory, task, backend, hf=hf)


def test_routing_differs_per_token_and_the_clamp_bites(ckpt_root):
    directory = checkpoint(ckpt_root)[0]
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        out = hf(torch.tensor([SEQUENCES[2]]), output_router_logits=True)
    for logits in out.router_logits:
        assert len({tuple(sorted(row)) for row in logits.topk(2, dim=-1).indices.tolist()}) >= 2
    config = json.loads((directory / "config.json").read_text())
    loose = directory.parent / f"{directory.name}-loose"
    if not loose.exists():
        loose.mkdir()
        for path in directory.iterdir():
            (loose / path.name).symlink_to(path)
        (loose / "config.json").unlink()
        (loose / "config.json").write_text(json.dumps({**config, "swiglu_limit": 100.0}))
    ids = [SEQUENCES[2]]
    clamped, unclamped = (polylm.load(d, backend="torch").forward(ids) for d in (directory, loose))
    assert np.abs(np.asarray(clamped) - np.asarray(unclamped)).max() > 1e-2


def test_interleaved_expert_stack_is_read_whole_by_slices_and_by_mlx(ckpt_root):
    directory = checkpoint(ckpt_root)[0]
    ir = model_ir(directory)
    weights = resolve(Checkpoint(directory), ir.tensor_shapes(), polylm_gpt_oss.FAMILY.module_names, "lm_head",
                      ("model.",), (), {})
    stored = load_file(directory / "model.safetensors")
    gate_up, bias = stored["model.layers.1.mlp.experts.gate_up_proj"], stored["model.layers.1.mlp.experts.gate_up_proj_bias"]
    expected = {"gate.weight": gate_up[..., 0::2].transpose(-1, -2), "up.weight": gate_up[..., 1::2].transpose(-1, -2),
                "gate.bias": bias[:, 0::2], "up.bias": bias[:, 1::2],
                "down.weight": stored["model.layers.1.mlp.experts.down_proj"].transpose(-1, -2)}
    expected = {f"layers.1.mlp.experts.{k}": v for k, v in expected.items()}
    expected["layers.1.attn.sinks.weight"] = stored["model.layers.1.self_attn.sinks"]
    with TensorReader(weights, torch.float32) as whole:
        for name, tensor in expected.items():
            assert torch.equal(whole.tensor(name), tensor), name
    for rank in range(2):
        plan = plan_shards(ir, Shard(rank, 2))
        assert plan.part("layers.1.mlp.experts.up.weight") == TensorSlice(1, 16 * rank, 16 * rank + 16)
        assert plan.part("layers.1.attn.sinks.weight") == TensorSlice(0, 2 * rank, 2 * rank + 2)
        with TensorReader(weights, torch.float32, plan=plan) as part:
            for name, tensor in expected.items():
                piece = plan.part(name)
                if piece is not None:
                    tensor = tensor.narrow(piece.dim, piece.start, piece.stop - piece.start)
                assert torch.equal(part.tensor(name), tensor), (rank, name)
    as_mx = mx.array(gate_up.numpy())
    for name in ("gate", "up"):
        got = np.array(weights[f"layers.1.mlp.experts.{name}.weight"].view_of(as_mx))
        assert np.array_equal(got, expected[f"layers.1.mlp.experts.{name}.weight"].numpy())


def test_two_ranks_match_one_process(ckpt_root, tmp_path):
    """`--tp 2` on torch end to end: each rank its heads with their sinks, its share of every expert's
    intermediate (gate/up interleaved in the checkpoint, biases included), the router and its bias replicated,
    sliding-window rings that wrap while it generates."""
    directory = checkpoint(ckpt_root)[0]
    port = str(free_port())
    rank0, _ = run_two_ranks(WORKER, {"gpt_oss": str(directory)}, tmp_path, lambda r: dict(
        RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
    assert_matches_one_process(rank0["gpt_oss"], polylm.load(directory, backend="torch"))


def test_two_mlx_ranks_match_one_process(ckpt_root, tmp_path):
    directory = checkpoint(ckpt_root)[0]
    rank0, _ = run_two_mlx_ranks({"gpt_oss": str(directory)}, tmp_path)
    assert_matches_one_process(rank0["gpt_oss"], polylm.load(directory, backend="mlx", dtype="float32"))
