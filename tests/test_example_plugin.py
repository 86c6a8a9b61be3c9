"""The example third-party plugin (examples/polylm-llama), installed with pip, matches transformers on every
backend; and a third-party backend registers the same way."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import checkpoints

EXAMPLE = Path(__file__).parent.parent / "examples" / "polylm-llama"
PARITY_SCRIPT = """
import json, sys
import numpy as np, torch, transformers
import polylm
sys.path.insert(0, {tests!r})
from parity import max_diff_padded, hf_greedy

out = {{}}
for family, directory in {checkpoints!r}.items():
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    for backend in {backends!r}:
        model = polylm.load(directory, backend=backend)
        diff = max(max_diff_padded(model, hf, "causal-lm", side) for side in ("left", "right"))
        same = model.generate([1, 5, 9, 44], max_new_tokens=12) == hf_greedy(hf, [1, 5, 9, 44], 12, eos_id=2)
        out[f"{{family}}/{{backend}}"] = [diff, same, model.ir.family]
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """pip-installs the example into a private target directory, as a user would install it."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(target), str(EXAMPLE)], check=True, timeout=300,
                   capture_output=True)
    return target


def small(family):
    return dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, vocab_size=checkpoints.VOCAB,
                bos_token_id=1, eos_token_id=2, pad_token_id=0)


def save(family, directory, **extra):
    import torch
    import transformers

    config = transformers.AutoConfig.for_model(family, **small(family), **extra)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.08) if param.ndim > 1 else param.add_(torch.randn_like(param) * 0.2)
    model.save_pretrained(directory)
    checkpoints.save_tokenizer(directory)
    return str(directory)


def test_example_plugin_parity_on_every_backend(installed, tmp_path):
    from test_parity import BACKENDS

    models = {
        "llama": save("llama", tmp_path / "llama", rope_parameters={
            "rope_type": "llama3", "factor": 8.0, "rope_theta": 500.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
        "qwen2": save("qwen2", tmp_path / "qwen2", tie_word_embeddings=True),
    }
    script = PARITY_SCRIPT.format(tests=str(Path(__file__).parent), checkpoints=models, backends=BACKENDS)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(installed), os.environ.get("PYTHONPATH", "")]),
           "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(report) == {f"{f}/{b}" for f in models for b in BACKENDS}
    for key, (diff, same, family) in report.items():
        assert diff <= 1e-4, key
        assert same, key
        assert family == key.split("/")[0]


def test_plugins_lists_the_example(installed):
    env = {**os.environ, "PYTHONPATH": str(installed)}
    result = subprocess.run([sys.executable, "-m", "polylm", "plugins"], capture_output=True, text=True, env=env,
                            timeout=120)
    assert "llama        polylm-llama 0.1.0" in result.stdout
    assert "qwen2        polylm-llama 0.1.0" in result.stdout


def test_third_party_backend_registers_like_a_family(tmp_path, make_ckpt):
    """A minimal test double: a backend from another distribution, wrapping the torch runtime."""
    dist = tmp_path / "polylm_twin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: polylm-twin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[polylm]\ntwin = polylm_twin\n")
    (tmp_path / "polylm_twin.py").write_text(textwrap.dedent("""
        from polylm.backend import Availability, Backend
        from polylm.hookspecs import hookimpl

        class TwinBackend(Backend):
            name = "twin"
            priority = -1
            dtypes = ("float32",)

            def availability(self):
                return Availability(True, "always", auto=False)

            def lower(self, ir, weights, dtype):
                from polylm_torch_common.runtime import TorchRuntime
                return TorchRuntime(ir, weights, dtype)

        @hookimpl
        def polylm_backends():
            return [TwinBackend()]
    """))
    directory = make_ckpt("gemma")
    script = (f"import polylm, numpy as np\n"
              f"a = polylm.load({str(directory)!r}, backend='twin').forward([[1, 5, 9]])\n"
              f"b = polylm.load({str(directory)!r}, backend='torch').forward([[1, 5, 9]])\n"
              f"print([b['name'] for b in polylm.backends()], float(np.abs(a - b).max()))\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    names, diff = result.stdout.strip().rsplit(" ", 1)
    assert "'twin'" in names and float(diff) <= 1e-5  # the torch backend runs the compiled CPU kernels
