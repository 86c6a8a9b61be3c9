"""polylm.testing itself: it fails loudly with numbers, reports backends it could not run, and says how to
install transformers when it is missing."""

import re
import sys

import pytest

import checkpoints
from polylm.testing import check_parity, tiny_checkpoint


def test_mismatch_names_backend_side_and_difference(make_ckpt):
    directory = make_ckpt("arcee")
    wrong = checkpoints.hf_model("arcee", seed=1)  # another model: logits and greedy ids differ
    with pytest.raises(AssertionError) as error:
        check_parity(directory, backends=["torch"], hf=wrong)
    message = str(error.value)
    for side in ("left", "right"):
        diff = re.search(rf"torch: {side}-padded causal-lm outputs differ from transformers by (\S+) > 0.0001",
                         message)
        assert diff is not None and float(diff.group(1)) > 0.1, message
    assert "torch: greedy ids of prompt 0 are" in message


def test_backends_not_run_are_reported_with_reasons(make_ckpt):
    report = check_parity(make_ckpt("gemma", "token-classification"), backends=["torch", "triton", "tpu"],
                          dtype="bfloat16", tolerance=0.2)
    assert set(report.max_diff) == {"torch"} and report.max_diff["torch"]["left"] <= 0.2
    assert report.greedy == {}  # no generation for a token classifier
    assert report.unavailable["tpu"].startswith("not installed (installed: ")
    assert report.unavailable["triton"] == "cannot compute in bfloat16 here (it does float32, float16)"
    assert "triton   not run: cannot compute in bfloat16" in str(report)


def test_missing_transformers_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r"needs transformers .*pip install 'polylm\[test\]'"):
        tiny_checkpoint(tmp_path, "llama", hidden_size=64)


def test_checkpoint_is_built_once_per_arguments(tmp_path):
    first = tiny_checkpoint(tmp_path, "bloom", hidden_size=64, n_layer=1, n_head=4)
    assert {p.name for p in first.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json"}
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert tiny_checkpoint(tmp_path, "bloom", n_head=4, n_layer=1, hidden_size=64) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert tiny_checkpoint(tmp_path, "bloom", hidden_size=64, n_layer=1, n_head=4, seed=1) != first
