"""The embedded demo model: small, deterministic, writes words from its training text, and is `polylm run`'s default."""

import re

import pytest

import polylm
from polylm.cli import main
from polylm.demo import DEMO_MODEL

PROMPT = "Once upon a time"
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def demo():
    return polylm.load(DEMO_MODEL, backend="torch")


def _words(text: str) -> list[str]:
    return [w.lower() for w in re.findall(r"[A-Za-z]+", text)]


def test_checkpoint_is_a_small_hf_causal_lm():
    names = {p.name for p in DEMO_MODEL.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= names
    assert sum(p.stat().st_size for p in DEMO_MODEL.iterdir() if p.is_file()) < 8_000_000
    assert polylm.load(DEMO_MODEL, backend="torch").task == "causal-lm"


def test_greedy_output_is_deterministic(demo):
    first = demo.generate(PROMPT, max_new_tokens=NEW_TOKENS)
    assert first == demo.generate(PROMPT, max_new_tokens=NEW_TOKENS)
    assert first == polylm.load(DEMO_MODEL, backend="torch").generate(PROMPT, max_new_tokens=NEW_TOKENS)


def test_greedy_output_is_words_of_the_training_text(demo):
    from pydoc_data.topics import topics  # the training source, see scripts/train_demo_model.py

    vocabulary = set(_words(" ".join(topics.values())))
    words = _words(demo.generate(PROMPT, max_new_tokens=NEW_TOKENS))
    assert len(words) >= 8, words
    known = [w for w in words if w in vocabulary]
    assert len(known) >= 0.6 * len(words), sorted(set(words) - vocabulary)


def test_run_without_model_uses_the_demo_model(demo, capsys):
    capsys.readouterr()
    assert main(["run", "--max-new-tokens", str(NEW_TOKENS), PROMPT]) == 0
    expected = polylm.load(DEMO_MODEL).generate(PROMPT, max_new_tokens=NEW_TOKENS)  # the same auto backend
    assert capsys.readouterr().out == expected + "\n"
