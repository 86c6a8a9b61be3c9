"""The example third-party plugin (examples/polylm-llama), installed with pip, matches transformers on every
backend; and a third-party backend registers the same way."""

import json
import os
import shutil
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
from pathlib import Path
from polylm.config import ConfigView
from polylm.loading.registry import registry
from polylm.testing import check_parity

def mapped_by(directory):
    family, mapped = registry().select(ConfigView.from_dir(Path(directory)), "causal-lm")
    return [family.name, family.to_ir.__module__, list(mapped.notes)]

print(json.dumps({{name: [asdict(check_parity(directory)) if name in {parity!r} else None, mapped_by(directory)]
                  for name, directory in {checkpoints!r}.items()}}))
"""
#: A small Llama-shaped config (polylm.testing adds the vocabulary and token ids).
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """pip-installs the example into a private target directory, as a user would install it (from a copy, so
    that no build directory of an earlier version is reused or left in the source tree)."""
    source, target = tmp_path_factory.mktemp("src") / EXAMPLE.name, tmp_path_factory.mktemp("site")
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(target), str(source)], check=True, timeout=300,
                   capture_output=True)
    return target


def test_example_plugin_parity_on_every_backend(installed, tmp_path):
    """polylm.testing.check_parity, run where the plugin is installed, as its author would run it. The plugin
    maps llama and qwen2 before polylm's built-ins; a config it declines goes on to the built-in, with a note."""
    from test_parity import BACKENDS

    models = {
        "llama": tiny_checkpoint(tmp_path, "llama", **SMALL, rope_parameters={
            "rope_type": "llama3", "factor": 8.0, "rope_theta": 500.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
        "qwen2": tiny_checkpoint(tmp_path, "qwen2", **SMALL, tie_word_embeddings=True),
        # declined by the example; the window never applies (no layer from max_window_layers on)
        "qwen2-window": tiny_checkpoint(tmp_path, "qwen2", **SMALL, use_sliding_window=True, max_window_layers=2),
    }
    script = PARITY_SCRIPT.format(checkpoints={name: str(directory) for name, directory in models.items()},
                                  parity=["llama", "qwen2"])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(installed), os.environ.get("PYTHONPATH", "")]),
           "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    reports = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(reports) == set(models)
    for name in ("llama", "qwen2"):
        report, mapped_by = reports[name]
        assert mapped_by == [name, "polylm_llama_example", []]
        assert report["unavailable"] == {} and set(report["max_diff"]) == set(BACKENDS)
        for backend in BACKENDS:
            assert max(report["max_diff"][backend].values()) <= 1e-4, (name, backend)
            assert report["greedy"][backend] == report["reference_greedy"], (name, backend)
        assert sum(map(len, report["reference_greedy"])) >= 12
    assert reports["qwen2-window"][1] == ["qwen2", "polylm_qwen2", [
        "llama (polylm-llama) declined this config (use_sliding_window=true is not supported by polylm-llama); "
        "qwen2 (polylm) handles it"]]


def test_plugins_lists_the_example_before_the_builtins(installed):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(installed), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", "polylm", "plugins"], capture_output=True, text=True, env=env,
                            timeout=120)
    assert result.returncode == 0 and "failed to load" not in result.stdout, result.stdout
    for model_type in ("llama", "qwen2"):
        lines = [line.strip() for line in result.stdout.splitlines() if line.strip().startswith(f"{model_type} ")]
        assert lines[0].startswith(f"{model_type:<12} polylm-llama 0.1.0 (entry point llama)")
        assert lines[1].startswith(f"{model_type:<12} polylm ") and lines[1].endswith(
            f"(entry point {model_type}, for configs the one above declines)")
        # the conflict is expected: the example replaces a built-in family on purpose
        assert (f"conflict: model_type {model_type!r} is claimed by llama (polylm-llama) and {model_type} (polylm); "
                f"using llama, then the others for configs it declines") in result.stdout


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
