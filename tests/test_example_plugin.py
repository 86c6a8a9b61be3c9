"""The example third-party plugin (examples/polylm-llama), installed with pip, matches transformers on every
backend; and a third-party backend registers the same way."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from polylm.testing import tiny_checkpoint

EXAMPLE = Path(__file__).parent.parent / "examples" / "polylm-llama"
PARITY_SCRIPT = """
import json
from dataclasses import asdict
import polylm
from polylm.testing import check_parity

print(json.dumps({{name: [asdict(check_parity(directory)), polylm.loading.model_ir(directory).family]
                  for name, directory in {checkpoints!r}.items()}}))
"""
#: A small Llama-shaped config (polylm.testing adds the vocabulary and token ids).
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """pip-installs the example into a private target directory, as a user would install it."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(target), str(EXAMPLE)], check=True, timeout=300,
                   capture_output=True)
    return target


def test_example_plugin_parity_on_every_backend(installed, tmp_path):
    """polylm.testing.check_parity, run where the plugin is installed, as its author would run it."""
    from test_parity import BACKENDS

    models = {
        "llama": tiny_checkpoint(tmp_path, "llama", **SMALL, rope_parameters={
            "rope_type": "llama3", "factor": 8.0, "rope_theta": 500.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
        "qwen2": tiny_checkpoint(tmp_path, "qwen2", **SMALL, tie_word_embeddings=True),
    }
    script = PARITY_SCRIPT.format(checkpoints={name: str(directory) for name, directory in models.items()})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(installed), os.environ.get("PYTHONPATH", "")]),
           "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    reports = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(reports) == set(models)
    for name, (report, family) in reports.items():
        assert family == name
        assert report["unavailable"] == {} and set(report["max_diff"]) == set(BACKENDS)
        for backend in BACKENDS:
            assert max(report["max_diff"][backend].values()) <= 1e-4, (name, backend)
            assert report["greedy"][backend] == report["reference_greedy"], (name, backend)
        assert sum(map(len, report["reference_greedy"])) >= 12


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
