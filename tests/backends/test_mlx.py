"""The MLX backend beyond the shared parity suite: when it is chosen, what happens without mlx, every checkpoint
form against transformers, its primitives against the torch reference, half precision, the decode window."""

import importlib
import importlib.metadata as metadata
import platform
import sys

import mlx.core as mx
import numpy as np
import pytest
import torch

import checkpoints
import polylm
import polylm_mlx
import polylm_mlx.runtime
from polylm.testing import SEQUENCES, hf_greedy, max_diff_padded, padded
from polylm.errors import BackendError
from polylm.ir import MLP, Norm
from polylm.loading.registry import Registry
from polylm_mlx import ops
from polylm_mlx.params import NormParams
from polylm_torch_common.ops import ReferenceOps
from polylm_torch_common.params import NormParams as TorchNormParams
from test_checkpoint_forms import CASES

TOLERANCE = 1e-4
#: Largest |half − float32| over the logits of the tiny test models (logits up to ~5 in magnitude): bf16 keeps
#: 8 significand bits, fp16 11, and the error grows through the layers. Measured maxima: 0.075 and 0.009.
HALF_TOLERANCE = {"bfloat16": 0.15, "float16": 0.02}


# -- when MLX is chosen ------------------------------------------------------------------------------------


def simulate_platform(monkeypatch, system, machine):
    monkeypatch.setattr(sys, "platform", system)
    monkeypatch.setattr(platform, "machine", lambda: machine)


def hide_mlx(monkeypatch):
    """Make `import mlx.core` raise ImportError, as on a machine without mlx."""
    for name in [m for m in sys.modules if m == "mlx" or m.startswith("mlx.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "mlx", None)
    monkeypatch.setitem(sys.modules, "mlx.core", None)


def torch_and_mlx_registry():
    """The built-in torch and mlx backends only, so a GPU backend on the test machine cannot interfere."""
    return Registry([p for p in metadata.entry_points(group="polylm") if p.name in ("torch", "mlx")])


def test_auto_picks_mlx_on_apple_silicon(monkeypatch):
    simulate_platform(monkeypatch, "darwin", "arm64")
    state = polylm_mlx.MLXBackend().availability()
    assert state.available and state.auto
    assert torch_and_mlx_registry().backend("auto").name == "mlx"


@pytest.mark.parametrize("system,machine", [("linux", "x86_64"), ("linux", "aarch64"), ("darwin", "x86_64")])
def test_elsewhere_mlx_runs_only_by_name(monkeypatch, system, machine):
    simulate_platform(monkeypatch, system, machine)
    state = polylm_mlx.MLXBackend().availability()
    assert state.available and not state.auto
    assert "only when asked for by name" in state.reason
    registry = torch_and_mlx_registry()
    assert registry.backend("auto").name == "torch"
    assert registry.backend("mlx").name == "mlx"


def test_mlx_ranks_above_torch():
    names = [b.name for b in torch_and_mlx_registry().ranked_backends()]
    assert names == ["mlx", "torch"]


def test_package_imports_without_mlx(monkeypatch):
    hide_mlx(monkeypatch)
    monkeypatch.delitem(sys.modules, "polylm_mlx")
    module = importlib.import_module("polylm_mlx")
    assert not module.MLXBackend().availability().available


@pytest.mark.parametrize("system,machine,command", [("linux", "x86_64", 'pip install "mlx[cpu]"'),
                                                    ("darwin", "arm64", 'pip install "polylm[mlx]"')])
def test_missing_mlx_gives_install_command(monkeypatch, make_ckpt, system, machine, command):
    directory = make_ckpt("helium")
    simulate_platform(monkeypatch, system, machine)
    hide_mlx(monkeypatch)
    state = polylm_mlx.MLXBackend().availability()
    assert not state.available and not state.auto
    with pytest.raises(BackendError) as error:
        polylm.load(directory, backend="mlx")
    message = str(error.value)
    assert "backend 'mlx' is not available here" in message and "mlx does not import" in message
    assert command in message
    assert torch_and_mlx_registry().backend("auto").name == "torch"


# -- numerics ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_checkpoint_form_matches_transformers(make_ckpt, case):
    family, build_options, config_overrides = CASES[case]
    model = polylm.load(make_ckpt(family, **build_options, **config_overrides), backend="mlx")
    hf = checkpoints.hf_model(family, **config_overrides)
    for side in ("left", "right"):
        assert max_diff_padded(model, hf, "causal-lm", side) <= TOLERANCE, side


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh", "gelu", "relu", "relu2"])
@pytest.mark.parametrize("gated", [True, False])
def test_activation_matches_torch(activation, gated):
    mlp = MLP(8, activation, gated)
    h = np.random.default_rng(0).normal(0, 2, (3, 16)).astype(np.float32)
    expected = ReferenceOps().activation(torch.from_numpy(h), mlp).numpy()
    # a few fp32 ulp of each value (the torch reference may run polylm's compiled kernel, another exp)
    assert (np.abs(np.array(ops.activation(mx.array(h), mlp)) - expected) <= 1e-6 * (1 + np.abs(expected))).all()


@pytest.mark.parametrize("kind,offset,bias", [("rms", 0.0, False), ("rms", 1.0, True), ("layer", 0.0, True),
                                              ("layer", 1.0, False)])
def test_norm_matches_torch(kind, offset, bias):
    rng = np.random.default_rng(1)
    x, weight, shift = (rng.normal(0, 1, shape).astype(np.float32) for shape in ((2, 5, 32), (32,), (32,)))
    spec = Norm(kind, 1e-5, offset, bias)
    ours = NormParams(spec, mx.array(weight + offset), mx.array(shift) if bias else None)
    reference = TorchNormParams(spec, torch.from_numpy(weight + offset), torch.from_numpy(shift) if bias else None)
    expected = ReferenceOps().norm(torch.from_numpy(x), reference).numpy()
    assert np.abs(np.array(ops.norm(mx.array(x), ours)) - expected).max() <= 1e-5


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("family", checkpoints.FAMILIES)
def test_half_precision_close_to_float32(make_ckpt, family, dtype):
    directory = make_ckpt(family)
    ids, mask = padded(SEQUENCES, "left")
    full = polylm.load(directory, backend="mlx").forward(ids, mask)
    half = polylm.load(directory, backend="mlx", dtype=dtype)
    assert half.dtype == dtype
    out = half.forward(ids, mask)
    assert out.dtype == np.float32 and np.isfinite(out).all()
    real = mask.astype(bool)
    assert np.abs(out - full)[real].max() <= HALF_TOLERANCE[dtype]
    assert (out.argmax(-1) == full.argmax(-1))[real].mean() >= 0.9


def test_bf16_checkpoint_loads_as_bf16_and_agrees_with_torch(make_ckpt):
    directory = make_ckpt("gemma", dtype="bfloat16")
    model = polylm.load(directory, backend="mlx")
    assert model.dtype == "bfloat16"
    assert model.runtime.params.embed.dtype == mx.bfloat16  # read as stored, no float32 round trip
    reference = polylm.load(directory, backend="torch")
    ids, mask = padded(SEQUENCES, "right")
    real = mask.astype(bool)
    # same weights, same dtype, same rounding points: only accumulation order differs
    assert np.abs(model.forward(ids, mask) - reference.forward(ids, mask))[real].max() <= HALF_TOLERANCE["bfloat16"]
    assert model.generate([SEQUENCES[0]], max_new_tokens=4)[0] == reference.generate([SEQUENCES[0]],
                                                                                      max_new_tokens=4)[0]


def test_fully_padded_query_rows_stay_finite(make_ckpt):
    model = polylm.load(make_ckpt("bloom"), backend="mlx")  # ALiBi
    ids = np.array([[0, 0, 0, 5, 6], [7, 8, 9, 10, 11]])
    mask = np.array([[0, 0, 0, 1, 1], [1, 1, 1, 1, 1]])
    assert np.isfinite(model.forward(ids, mask)).all()


@pytest.mark.parametrize("family", ["helium", "bloom", "nemotron"])
def test_decode_across_cache_windows_matches_transformers(make_ckpt, monkeypatch, family):
    """Decode steps attend over the cache in windows; with tiny windows generation crosses several."""
    monkeypatch.setattr(polylm_mlx.runtime, "DECODE_WINDOW", 4)
    model = polylm.load(make_ckpt(family), backend="mlx")
    hf = checkpoints.hf_model(family)
    prompts = [SEQUENCES[1], SEQUENCES[0]]  # left-padded together: rows at different positions
    for prompt, got in zip(prompts, model.generate(prompts, max_new_tokens=10)):
        assert got == hf_greedy(hf, prompt, 10, eos_id=2)
