"""The Triton backend as a plugin: availability (simulated CUDA / interpreter / no triton), lowering, and the
fixed-shape decode step that a CUDA graph captures, checked eagerly against the ordinary forward, as the
runtime routes decode steps through it."""

import importlib.metadata
import importlib.util
import subprocess
import sys

import numpy as np
import pytest
import torch

import checkpoints
import polylm
import polylm_triton
from polylm import testing
from polylm.testing import SEQUENCES, padded
from polylm.backend import Step
from polylm.errors import BackendError
from polylm.loading.registry import Registry
from polylm_triton import TritonBackend, cuda_graphs, interpreting
from polylm_triton.graph import DecodeGraph, GraphedRuntime


@pytest.fixture
def gpu(monkeypatch):
    """A simulated CUDA machine without the interpreter."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Simulated H100")


def test_cuda_makes_it_available_and_automatic(gpu):
    state = TritonBackend().availability()
    assert state.available and state.auto
    assert "Simulated H100" in state.reason
    assert TritonBackend().dtypes == ("float32", "bfloat16", "float16")


def test_auto_prefers_triton_over_torch_on_cuda(gpu):
    points = [p for p in importlib.metadata.entry_points(group="polylm") if p.name in ("torch", "triton")]
    assert Registry(points).backend("auto").name == "triton"


def test_interpreter_is_available_but_never_automatic(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the interpreter wins even beside a GPU
    state = TritonBackend().availability()
    assert state.available and not state.auto
    assert "interpreter" in state.reason
    assert "bfloat16" not in TritonBackend().dtypes
    points = [p for p in importlib.metadata.entry_points(group="polylm") if p.name in ("torch", "triton")]
    assert Registry(points).backend("auto").name == "torch"


def test_without_cuda_or_interpreter_it_says_why(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    state = TritonBackend().availability()
    assert not state.available and "no CUDA GPU" in state.reason
    with pytest.raises(BackendError, match="no CUDA GPU"):
        TritonBackend().lower(None, None, "float32")


def test_without_triton_installed_it_says_how_to_install(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "triton" else real_find_spec(name, *a))
    state = TritonBackend().availability()
    assert not state.available and state.reason == "triton is not installed"
    points = [p for p in importlib.metadata.entry_points(group="polylm") if p.name in ("torch", "triton")]
    with pytest.raises(BackendError, match=r'pip install "polylm\[triton\]"'):
        Registry(points).backend("triton")


def test_importing_the_plugin_does_not_import_triton():
    code = "import sys, polylm_triton; polylm_triton.TritonBackend().availability(); print('triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_bfloat16_needs_a_gpu(make_ckpt):
    if interpreting():  # the interpreter sees bfloat16 values as raw bits
        with pytest.raises(BackendError, match="bfloat16"):
            polylm.load(make_ckpt("gemma"), backend="triton", dtype="bfloat16")
    else:
        assert polylm.load(make_ckpt("gemma"), backend="triton", dtype="bfloat16").dtype == "bfloat16"


@pytest.mark.parametrize("family", checkpoints.FAMILIES)
@pytest.mark.parametrize("dtype", ["float16"] if interpreting() else ["float16", "bfloat16"])
def test_16_bit_logits_are_as_close_to_float32_as_the_torch_backends(make_ckpt, family, dtype):
    """The stated 16-bit tolerance: within twice the torch backend's own 16-bit error, plus 0.01, of float32."""
    directory = make_ckpt(family)
    ids, mask = padded(SEQUENCES, "left")
    real = mask.astype(bool)
    reference = polylm.load(directory, backend="torch", dtype="float32").forward(ids, mask)[real]
    torch_error = np.abs(polylm.load(directory, backend="torch", dtype=dtype).forward(ids, mask)[real] - reference)
    triton_error = np.abs(polylm.load(directory, backend="triton", dtype=dtype).forward(ids, mask)[real] - reference)
    assert np.isfinite(triton_error).all()
    assert triton_error.max() <= 2 * torch_error.max() + 0.01


# IR features the parity families leave at their defaults: the RoPE scalings (dynamic NTK per row, past
# max_position_embeddings), BLOOM's post-LN residual, projection biases, an untied head
FEATURES = {
    "yarn": ("arcee", dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                            "original_max_position_embeddings": 64})),
    "linear": ("helium", dict(rope_parameters={"rope_type": "linear", "factor": 3.0, "rope_theta": 500.0})),
    "llama3": ("gemma", dict(rope_parameters={"rope_type": "llama3", "factor": 8.0, "rope_theta": 50.0,
                                              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                              "original_max_position_embeddings": 16})),
    "dynamic": ("nemotron", dict(max_position_embeddings=8, rope_parameters={
        "rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0, "partial_rotary_factor": 0.5})),
    "post-ln-residual": ("bloom", dict(apply_residual_connection_post_layernorm=True)),
    "biases-untied": ("arcee", dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=False)),
}


@pytest.mark.parametrize("feature", FEATURES)
def test_ir_features_match_the_torch_backend(make_ckpt, feature):
    family, overrides = FEATURES[feature]
    directory = make_ckpt(family, **overrides)
    ours, reference = (polylm.load(directory, backend=name) for name in ("triton", "torch"))
    for side in ("left", "right"):
        ids, mask = padded(SEQUENCES, side)
        real = mask.astype(bool)
        assert np.abs(ours.forward(ids, mask)[real] - reference.forward(ids, mask)[real]).max() <= 1e-4, side


# -- the decode step a CUDA graph captures ------------------------------------------------------------------

#: routed experts (renormalized top-2 of 4) with a gated shared expert, after a dense layer
QWEN2_MOE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                 num_experts_per_tok=2, intermediate_size=96, moe_intermediate_size=32,
                 shared_expert_intermediate_size=48, mlp_only_layers=[0], norm_topk_prob=True)


def graph_checkpoint(make_ckpt, ckpt_root, family):
    if family == "qwen2_moe":
        return testing.tiny_checkpoint(ckpt_root, family, **QWEN2_MOE)
    return make_ckpt(family)


# RoPE (interleaved, GQA), ALiBi (MHA), mixture of experts (routed on the device)
@pytest.mark.parametrize("family", ["helium", "bloom", "qwen2_moe"])
def test_fixed_shape_decode_step_matches_forward(make_ckpt, ckpt_root, family):
    """DecodeGraph's step — slot buffers sized to the cache, the slot read from the device — run eagerly,
    gives the logits of the ordinary forward, step after step, for a left-padded batch."""
    runtime = polylm.load(graph_checkpoint(make_ckpt, ckpt_root, family), backend="triton").runtime
    prompts = [[1, 5, 9, 44, 21, 7], [1, 70, 71]]
    longest, steps = 6, 4
    total = longest + steps
    ids = np.zeros((2, longest), dtype=np.int64)
    mask = np.zeros((2, total), dtype=bool)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt):] = prompt
        mask[row, longest - len(prompt):] = True
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    eager_cache, graph_cache = runtime.new_cache(2, total + 3), runtime.new_cache(2, total + 3)
    prefill = Step(ids, positions[:, :longest], mask[:, :longest], gather=np.full(2, longest - 1))
    logits = runtime.forward(prefill, eager_cache)
    runtime.forward(prefill, graph_cache)
    graph = DecodeGraph(runtime, graph_cache, capture=False)
    for slot in range(longest, total):
        tokens = logits.argmax(-1)[:, None]
        step = Step(tokens, positions[:, :slot + 1], mask[:, :slot + 1], gather=np.zeros(2, dtype=np.int64))
        logits = runtime.forward(step, eager_cache)
        graphed = graph.step(step)
        assert np.abs(graphed - logits).max() <= 1e-5
    assert graph_cache.length == eager_cache.length == total


def test_decode_graph_needs_graph_safe_ops_and_cuda(make_ckpt):
    runtime = polylm.load(make_ckpt("gemma"), backend="triton").runtime
    with pytest.raises(BackendError, match="CUDA"):
        DecodeGraph(runtime, runtime.new_cache(1, 8))
    reference = polylm.load(make_ckpt("gemma"), backend="torch").runtime
    with pytest.raises(BackendError, match="graph"):
        DecodeGraph(reference, reference.new_cache(1, 8), capture=False)


def test_cuda_graphs_are_asked_for_and_only_on_cuda(gpu, monkeypatch):
    assert not cuda_graphs()  # off by default
    monkeypatch.setenv("POLYLM_CUDA_GRAPH", "1")
    assert cuda_graphs()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not cuda_graphs()


@pytest.mark.parametrize("family", ["helium", "qwen2_moe"])
def test_graphed_runtime_decodes_through_one_graph_per_cache(make_ckpt, ckpt_root, monkeypatch, family):
    """With CUDA graphs on (forced here; on the CPU the graph's step runs eagerly), generation's one-token steps
    go through the cache's DecodeGraph and give the tokens of the plain runtime."""
    directory = graph_checkpoint(make_ckpt, ckpt_root, family)
    prompts = [[1, 5, 9, 44, 21, 7], [1, 70, 71]]
    want = polylm.load(directory, backend="triton").generate(prompts, max_new_tokens=6)
    monkeypatch.setattr(polylm_triton, "cuda_graphs", lambda: True)
    model = polylm.load(directory, backend="triton")
    assert isinstance(model.runtime, GraphedRuntime)
    graphs = []
    graph_step = DecodeGraph.step
    monkeypatch.setattr(DecodeGraph, "step",
                        lambda self, step, *take: graphs.append(self) or graph_step(self, step, *take))
    assert model.generate(prompts, max_new_tokens=6) == want
    assert len(graphs) == max(map(len, want)) - 1 and len(set(map(id, graphs))) == 1  # first token: the prefill
    model.runtime.new_cache(1, 4)  # a new cache lets the last graph, and the cache it holds, go
    assert model.runtime._graph is None
