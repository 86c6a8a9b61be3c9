"""The first five minutes: Hub cache resolution, chat templates, `polylm plugins`, progress bars."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

import polylm
from polylm.generate.chat import render
from polylm.cli import main
from polylm.errors import ConfigError, TokenizerError

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
          "{% endif %}")
GEMMA_STYLE = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not "
               "supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != "
               "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate') }}{% endif %}"
               "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
               "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
               "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}")
MESSAGES = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Hi! "},
            {"role": "user", "content": "Tell me about Paris."}]


def with_template(make_ckpt, tmp_path, template, as_file=False):
    directory = tmp_path / "chat-model"
    shutil.copytree(make_ckpt("gemma"), directory)
    if as_file:
        (directory / "chat_template.jinja").write_text(template)
    else:
        settings = json.loads((directory / "tokenizer_config.json").read_text())
        settings["chat_template"] = template
        (directory / "tokenizer_config.json").write_text(json.dumps(settings))
    return directory


@pytest.mark.parametrize("template,as_file", [(CHATML, False), (GEMMA_STYLE, True)])
def test_chat_template_matches_transformers(make_ckpt, tmp_path, template, as_file):
    import transformers

    directory = with_template(make_ckpt, tmp_path, template, as_file)
    hf = transformers.AutoTokenizer.from_pretrained(directory)
    expected_text = hf.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    model = polylm.load(directory, backend="torch")
    assert render(template, MESSAGES, model.tokenizer.settings) == expected_text
    assert model.chat_prompt(MESSAGES) == hf(expected_text, add_special_tokens=False)["input_ids"]
    reply = model.chat(MESSAGES, max_new_tokens=6)
    assert reply == model.tokenizer.decode(model.generate(model.chat_prompt(MESSAGES), max_new_tokens=6))


def test_template_errors_are_readable(make_ckpt, tmp_path):
    model = polylm.load(with_template(make_ckpt, tmp_path, GEMMA_STYLE), backend="torch")
    with pytest.raises(polylm.PolylmError, match="System role not supported"):
        model.chat([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}])
    plain = polylm.load(make_ckpt("gemma"), backend="torch")
    with pytest.raises(TokenizerError, match="no chat template.*--chat-template"):
        plain.chat(MESSAGES)


def test_chat_cli_one_turn_from_stdin(make_ckpt, tmp_path):
    directory = with_template(make_ckpt, tmp_path, CHATML)
    result = subprocess.run([sys.executable, "-m", "polylm", "chat", "--model", str(directory), "--backend",
                             "torch", "--max-new-tokens", "5"], input="Hello", capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    model = polylm.load(directory, backend="torch")
    assert result.stdout == model.chat([{"role": "user", "content": "Hello"}], max_new_tokens=5) + "\n"
    template_file = tmp_path / "t.jinja"
    template_file.write_text(CHATML)
    plain = make_ckpt("gemma")
    result = subprocess.run([sys.executable, "-m", "polylm", "chat", "--model", str(plain), "--backend", "torch",
                             "--chat-template", str(template_file), "--max-new-tokens", "3"], input="Hi",
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    result = subprocess.run([sys.executable, "-m", "polylm", "chat", "--model", str(plain)], input="Hi",
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "no chat template" in result.stderr


def lay_out_hub_cache(root, repo, source, commit="0123abcd" * 5):
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    blobs, snapshot = repo_dir / "blobs", repo_dir / "snapshots" / commit
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, file in enumerate(sorted(source.iterdir())):
        blob = blobs / f"blob{i}"
        shutil.copy(file, blob)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    return snapshot


@pytest.mark.parametrize("variable", ["HF_HUB_CACHE", "HF_HOME"])
def test_hub_repo_id_from_local_cache(make_ckpt, tmp_path, monkeypatch, variable):
    root = tmp_path / "hf"
    cache = root / "hub" if variable == "HF_HOME" else root
    snapshot = lay_out_hub_cache(cache, "acme/tiny-helium", make_ckpt("helium", shard_size="60KB"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv(variable, str(root))
    model = polylm.load("acme/tiny-helium", backend="torch")
    assert model.path == snapshot
    reference = polylm.load(make_ckpt("helium", shard_size="60KB"), backend="torch")
    assert model.generate([1, 5, 9], max_new_tokens=5) == reference.generate([1, 5, 9], max_new_tokens=5)


def test_hub_repo_id_not_cached_says_where_it_looked(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no download: tests/test_hub.py downloads from a local fake Hub
    with pytest.raises(ConfigError, match=f"no cached snapshot.*{tmp_path}"):
        polylm.load("acme/absent-model")
    assert main(["run", "--model", "acme/absent-model", "hi"]) == 2
    assert "looked in" in capsys.readouterr().err


def test_plugins_command_lists_sources_and_failures(tmp_path):
    dist = tmp_path / "broken_family-0.3.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-family\nVersion: 0.3\n")
    (dist / "entry_points.txt").write_text("[polylm]\nbroken = broken_family_module\n")
    (tmp_path / "broken_family_module.py").write_text(textwrap.dedent("""
        import this_dependency_is_missing
    """))
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    result = subprocess.run([sys.executable, "-m", "polylm", "plugins"], capture_output=True, text=True, env=env,
                            timeout=120)
    assert result.returncode == 0
    assert "gemma" in result.stdout and "polylm 0.1.0" in result.stdout
    assert "broken" in result.stdout and "broken-family" in result.stdout
    assert "No module named 'this_dependency_is_missing'" in result.stdout


def test_progress_bar_only_on_a_terminal(make_ckpt, capsys):
    polylm.load(make_ckpt("helium", shard_size="60KB"), backend="torch")
    assert "loading shards" not in capsys.readouterr().err  # stderr is captured, not a terminal
