"""Task heads beyond transformers' classes, and the pipelines that read them (classify, tag, answer)."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import checkpoints
import polylm
from polylm import testing
from polylm.errors import InputError, TaskError
from polylm.cli import main
from test_parity import BACKENDS


def qa_checkpoint(root, family):
    """A QA checkpoint for a family transformers has no QA class for: its base model plus `qa_outputs`."""
    return with_qa_head(checkpoints.build(root, family), root / f"{family}-qa")


def with_qa_head(base, directory):
    """`directory`, once: the causal-LM checkpoint `base` with a random `qa_outputs` head for its `lm_head`."""
    if directory.exists():
        return directory
    config = json.loads((base / "config.json").read_text())
    tensors = {k: v for k, v in load_file(base / "model.safetensors").items() if not k.startswith("lm_head.")}
    generator = torch.Generator().manual_seed(3)
    tensors["qa_outputs.weight"] = torch.randn(2, config["hidden_size"], generator=generator) * 0.1
    tensors["qa_outputs.bias"] = torch.randn(2, generator=generator) * 0.1
    directory.mkdir()
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    config["architectures"] = [config["architectures"][0].replace("ForCausalLM", "ForQuestionAnswering")]
    (directory / "config.json").write_text(json.dumps(config))
    testing.save_tokenizer(directory)
    return directory


def qa_reference(directory):
    """transformers' outputs for a `with_qa_head` checkpoint, as `testing.check_parity(hf=…)` reads them: its base
    model's hidden states through `qa_outputs`."""
    import transformers

    base = transformers.AutoModel.from_pretrained(directory, dtype=torch.float32).eval()
    tensors = load_file(directory / "model.safetensors")

    def run(ids):
        logits = base(ids).last_hidden_state @ tensors["qa_outputs.weight"].T + tensors["qa_outputs.bias"]
        start, end = logits.unbind(-1)
        return SimpleNamespace(start_logits=start, end_logits=end)
    return run


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", ["helium", "gemma"])
def test_qa_head_without_transformers_class(ckpt_root, family, backend):
    import transformers

    directory = qa_checkpoint(ckpt_root, family)
    model = polylm.load(directory, backend=backend)
    assert model.task == "question-answering"
    ids = np.array([[1, 5, 9, 44, 21, 7], [0, 0, 1, 33, 2, 8]])
    mask = (ids != 0).astype(int)
    mask[0] = 1
    out = model.forward(ids, mask)
    assert out["start_logits"].shape == (2, 6) and out["end_logits"].shape == (2, 6)
    again = model.forward(ids, mask)
    assert np.array_equal(out["start_logits"], again["start_logits"])
    # the head is a linear map of transformers' base-model hidden states
    base = transformers.AutoModel.from_pretrained(directory, dtype=torch.float32).eval()
    tensors = load_file(directory / "model.safetensors")
    with torch.no_grad():
        hidden = base(torch.tensor(ids[:1])).last_hidden_state[0]
        expected = (hidden @ tensors["qa_outputs.weight"].T + tensors["qa_outputs.bias"]).numpy()
    assert np.abs(out["start_logits"][0] - expected[:, 0]).max() <= 1e-4
    assert np.abs(out["end_logits"][0] - expected[:, 1]).max() <= 1e-4


@pytest.fixture(scope="module")
def classifier(make_ckpt):
    return polylm.load(make_ckpt("arcee", "sequence-classification"), backend="torch")


def test_classify_scores_match_transformers_softmax(classifier):
    texts = ["The quick brown fox", "Paris is the capital of France. Berlin too."]
    labels = classifier.classify(texts)
    hf = checkpoints.hf_model("arcee", "sequence-classification")
    for text, result in zip(texts, labels):
        ids = classifier.tokenizer.encode(text)
        with torch.no_grad():
            probs = torch.softmax(hf(torch.tensor([ids])).logits[0], -1).numpy()
        assert result.label == ["neg", "neu", "pos"][int(probs.argmax())]
        assert abs(result.score - float(probs.max())) <= 1e-5


def test_tag_gives_token_texts_and_labels(make_ckpt):
    model = polylm.load(make_ckpt("bloom", "token-classification"), backend="torch")
    text = "Once upon a time in Paris"
    tokens = model.tag(text)
    assert "".join(t.text for t in tokens) == text
    assert all(t.label in ("neg", "neu", "pos") and 0 < t.score <= 1 for t in tokens)
    assert all(text[t.start:t.end] == t.text for t in tokens)


@pytest.fixture(scope="module")
def reader(make_ckpt):
    return polylm.load(make_ckpt("nemotron", "question-answering"), backend="torch")


def test_answer_is_best_valid_span(reader):
    context = "Paris is the capital of France. Berlin is the capital of Germany."
    result = reader.answer("What is the capital of France?", context)
    assert 0 < result.score <= 1
    assert context[result.start:result.end] == result.answer
    assert len(reader.tokenizer.encode(result.answer, add_special_tokens=False)) <= 15
    # exhaustive check of the span rule on the same window
    enc = reader.tokenizer.encode_pair("What is the capital of France?", context)
    slots = [i for i, s in enumerate(enc.sequence_ids) if s == 1]
    out = reader.forward([enc.ids])
    sp = np.exp(out["start_logits"][0, slots]); sp /= sp.sum()
    ep = np.exp(out["end_logits"][0, slots]); ep /= ep.sum()
    best = max(sp[s] * ep[e] for s in range(len(slots)) for e in range(s, min(len(slots), s + 15)))
    assert abs(result.score - best) <= 1e-6


def test_answer_reads_long_context_in_windows(reader):
    context = " ".join(["The quick brown fox jumps over the lazy dog."] * 12)
    result = reader.answer("Who jumps?", context, window=40, stride=8)
    assert context[result.start:result.end] == result.answer and result.score > 0


@pytest.mark.parametrize("question,context,message", [
    ("Where?", "", "non-empty context"),
    ("", "Paris is nice.", "non-empty question"),
    ("Where " * 30, "Paris is nice.", "leaving no room for the context"),
])
def test_answer_bad_inputs(reader, question, context, message):
    with pytest.raises(InputError, match=message):
        reader.answer(question, context, window=24)


def test_pipeline_on_wrong_task_names_the_task(classifier, make_ckpt):
    with pytest.raises(TaskError, match="holds a sequence-classification model"):
        classifier.generate("hello", max_new_tokens=2)
    causal = polylm.load(make_ckpt("arcee"), backend="torch")
    with pytest.raises(TaskError, match="holds a causal-lm model; classify needs"):
        causal.classify(["x"])


def test_head_checkpoint_loaded_as_other_task_says_which(make_ckpt):
    from polylm.errors import PolylmError

    with pytest.raises(PolylmError, match="score"):
        polylm.load(make_ckpt("gemma", "sequence-classification"), backend="torch", task="causal-lm")


def test_cli_pipelines(make_ckpt, capsys):
    assert main(["classify", "--model", str(make_ckpt("arcee", "sequence-classification")), "--json",
                 "good", "bad"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 2 and {"label", "score"} <= rows[0].keys()
    assert main(["answer", "--model", str(make_ckpt("nemotron", "question-answering")), "--question", "Where?",
                 "--context", "Paris is the capital of France."]) == 0
    assert "score" in capsys.readouterr().out
    assert main(["run", "--model", str(make_ckpt("arcee", "sequence-classification")), "hi"]) == 2
    assert "holds a sequence-classification model" in capsys.readouterr().err
    assert main(["tag", "--model", str(make_ckpt("arcee")), "hi"]) == 2
    assert "holds a causal-lm model" in capsys.readouterr().err
