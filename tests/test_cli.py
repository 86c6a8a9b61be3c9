"""The command line: exit codes, one-line errors, streaming output."""

import os
import subprocess
import sys

import pytest

from polylm.cli import main


def run_cli(*args):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "polylm", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def test_run_streams_greedy_text(make_ckpt):
    import polylm

    directory = make_ckpt("gemma")
    result = run_cli("run", "--model", str(directory), "--max-new-tokens", "8", "--backend", "torch", "Once upon")
    assert result.returncode == 0, result.stderr
    expected = polylm.load(directory, backend="torch").generate("Once upon", max_new_tokens=8)
    assert result.stdout == expected + "\n"


@pytest.mark.parametrize("args,message", [
    (["run", "--model", "/no/such/dir", "hi"], "model directory not found"),
    (["run", "--model", "{ckpt}", "--backend", "quantum", "hi"], "unknown backend 'quantum'"),
    (["run", "--model", "{ckpt}", "--top-p", "1.5", "hi"], "top_p must be in (0, 1]"),
    (["run", "--model", "{ckpt}", "--max-new-tokens", "-1", "hi"], "max_new_tokens must be an integer"),
    (["run", "--model", "{ckpt}", "--dtype", "int3", "hi"], "unknown dtype 'int3'"),
    (["run", "--model", "{ckpt}", "--max-new-tokens", "many", "hi"], "invalid int value"),
    (["frobnicate"], "invalid choice"),
])
def test_user_errors_exit_2_with_one_line(make_ckpt, capsys, args, message):
    directory = make_ckpt("helium")
    capsys.readouterr()
    before = sorted((p.name, p.stat().st_mtime_ns) for p in directory.iterdir())
    code = main([a.replace("{ckpt}", str(directory)) for a in args])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("polylm: error: ") and message in err
    assert "Traceback" not in err
    assert sorted((p.name, p.stat().st_mtime_ns) for p in directory.iterdir()) == before


def test_listing_commands():
    result = run_cli("backends")
    assert result.returncode == 0 and "torch" in result.stdout and "available" in result.stdout
    result = run_cli("families")
    assert result.returncode == 0 and "gemma" in result.stdout and "polylm" in result.stdout


def test_version_and_help():
    import polylm

    result = run_cli("--version")
    assert result.returncode == 0 and polylm.__version__ in result.stdout
    result = run_cli("run", "--help")
    assert result.returncode == 0 and "example:" in result.stdout


def test_bench_reports_import_load_and_model_memory(make_ckpt):
    import json

    result = run_cli("bench", "--model", str(make_ckpt("gemma")), "--backend", "torch", "--prompt-tokens", "4",
                     "--new-tokens", "2", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["new_tokens"] == 2 and report["import_s"] > 0 and report["load_s"] > 0
    if sys.platform.startswith("linux"):  # the RSS before the load comes from /proc
        assert 0 < report["model_rss_mb"] < report["peak_rss_mb"]


def test_bare_polylm_prints_its_commands():
    result = run_cli()
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout.startswith("usage: polylm") and all(f"    {c} " in result.stdout for c in ("run", "serve", "bench"))


def test_abbreviated_flags_are_refused(make_ckpt):
    result = run_cli("run", "--model", str(make_ckpt("helium")), "--max-new-token", "3", "hi")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "unrecognized arguments: --max-new-token" in result.stderr


def test_quantize_and_quiet_on_every_model_command(make_ckpt):
    import polylm

    directory = make_ckpt("helium")
    result = run_cli("run", "--model", str(directory), "--backend", "torch", "--quantize", "int8", "--max-new-tokens",
                     "6", "Once upon", "--quiet")
    assert result.returncode == 0, result.stderr
    expected = polylm.load(directory, backend="torch", quantize="int8").generate("Once upon", max_new_tokens=6)
    assert result.stdout == expected + "\n"
    assert main(["--quiet", "families"]) == 0 and main(["families", "--quiet"]) == 0


def test_a_file_as_model_says_it_is_a_file(tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"x")
    result = run_cli("run", "--model", str(weights), "hi")
    assert result.returncode == 2 and "is a file, not a model directory" in result.stderr


def test_an_installed_backend_that_cannot_run_gets_no_install_hint(make_ckpt, monkeypatch):
    import polylm
    from polylm.errors import BackendError

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # triton is installed; this machine has no CUDA GPU
    with pytest.raises(BackendError, match="no CUDA GPU") as caught:
        polylm.load(make_ckpt("helium"), backend="triton")
    assert "install" not in str(caught.value)


def test_bench_refuses_a_prompt_longer_than_the_context(make_ckpt):
    result = run_cli("bench", "--model", str(make_ckpt("gemma")), "--backend", "torch", "--prompt-tokens", "3000")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "3000 prompt tokens + 64 new exceed the model's context of 256 tokens" in result.stderr


def test_bench_of_a_task_head_reports_no_decode(make_ckpt):
    import json

    result = run_cli("bench", "--model", str(make_ckpt("gemma", "sequence-classification")), "--backend", "torch",
                     "--prompt-tokens", "16", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["decode_tok_s"] is None and report["new_tokens"] == 0 and report["prefill_tok_s"] > 0
