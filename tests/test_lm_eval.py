"""`echo` with `logprobs` in /v1/completions (a prompt's own token logprobs, OpenAI's legacy format), checked against
transformers on the same tiny checkpoint, and lm-evaluation-harness itself: its `local-completions` model against
an in-process `polylm serve` gives the accuracy and per-choice loglikelihoods of its `hf` model."""

import json

import httpx
import numpy as np
import pytest
import torch
import transformers

import polylm
from polylm.generate.scoring import prompt_logprobs
from polylm.generate.stream import token_offsets
from polylm.serve import engine as engine_module
from test_server import NAME, running

PROMPT = "Once upon a time there was a little model"
OTHER = "The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def checkpoint(make_ckpt):
    return make_ckpt("helium")


@pytest.fixture(scope="module")
def model(checkpoint):
    return polylm.load(checkpoint, backend="torch")


@pytest.fixture(scope="module")
def served(model):
    with running(model, max_batch=4) as (url, _):
        yield url


@pytest.fixture(scope="module")
def hf(checkpoint):
    return transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()


def complete(url: str, **body) -> dict:
    response = httpx.post(url + "/v1/completions", json={"model": NAME, **body}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def hf_logprobs(hf, ids: list[int]) -> np.ndarray:
    """transformers' next-token log-probabilities [len(ids), vocab] (float64 of its float32 logits)."""
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits, dim=-1).numpy()


def test_echo_logprobs_equal_transformers(served, model, hf):
    reply = complete(served, prompt=[PROMPT, OTHER], echo=True, logprobs=3, max_tokens=0)
    assert reply["usage"]["completion_tokens"] == 0
    for text, choice in zip([PROMPT, OTHER], reply["choices"]):
        ids = model.tokenizer.encode(text)
        expected = hf_logprobs(hf, ids)
        logprobs = choice["logprobs"]
        assert choice["text"] == text and choice["finish_reason"] == "length"
        assert logprobs["tokens"] == [model.tokenizer.decode([t], skip_special_tokens=False) for t in ids]
        assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
        np.testing.assert_allclose(logprobs["token_logprobs"][1:], expected[np.arange(len(ids) - 1), ids[1:]],
                                   atol=1e-4, rtol=0)
        for row, top in zip(expected, logprobs["top_logprobs"][1:]):  # tokens with one text share a key
            best = np.sort(row)[::-1][:3]
            assert 1 <= len(top) <= 3 and all(np.abs(best - value).min() < 1e-4 for value in top.values())
        assert logprobs["text_offset"] == [len(model.tokenizer.decode(ids[:i])) for i in range(len(ids))]


def test_echo_then_generated_tokens(served, model):
    ids = model.tokenizer.encode(PROMPT)
    plain = complete(served, prompt=ids, max_tokens=5, temperature=0, logprobs=2)["choices"][0]
    echoed = complete(served, prompt=ids, max_tokens=5, temperature=0, logprobs=2, echo=True)["choices"][0]
    prompt_text = model.tokenizer.decode(ids)  # token ids echo as their text
    assert echoed["text"] == prompt_text + plain["text"]
    count = len(ids)
    assert echoed["logprobs"]["tokens"][count:] == plain["logprobs"]["tokens"]
    # the second request reuses the first one's cached prefix: the same numbers up to float32 rounding
    assert echoed["logprobs"]["token_logprobs"][count:] == pytest.approx(plain["logprobs"]["token_logprobs"], abs=1e-5)
    for top, plain_top in zip(echoed["logprobs"]["top_logprobs"][count:], plain["logprobs"]["top_logprobs"]):
        assert top == pytest.approx(plain_top, abs=1e-5)
    assert echoed["logprobs"]["text_offset"][count:] == [len(prompt_text) + o for o in plain["logprobs"]["text_offset"]]
    bare = complete(served, prompt=PROMPT, max_tokens=5, temperature=0, echo=True)["choices"][0]
    assert bare["text"] == PROMPT + plain["text"] and bare["logprobs"] is None


def test_echo_streams_the_prompt_first(served, model):
    whole = complete(served, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=1, echo=True)["choices"][0]
    with httpx.stream("POST", served + "/v1/completions", timeout=60, json={
            "model": NAME, "prompt": PROMPT, "max_tokens": 4, "temperature": 0, "logprobs": 1, "echo": True,
            "stream": True}) as response:
        chunks = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    first = chunks[0]["choices"][0]
    assert first["text"] == PROMPT and first["finish_reason"] is None
    assert len(first["logprobs"]["tokens"]) == len(model.tokenizer.encode(PROMPT))
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["text"]
    streamed = [lp for chunk in chunks for lp in (chunk["choices"][0]["logprobs"] or {}).get("token_logprobs", [])]
    assert streamed[0] is None and streamed[1:] == pytest.approx(whole["logprobs"]["token_logprobs"][1:], abs=1e-5)
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["finish_reason"]


def test_echo_lists_the_end_of_sequence_token(checkpoint, model):
    """lm-eval sends max_tokens 1 and drops the last logprob: a reply ending at eos must still list that token."""
    ids = model.tokenizer.encode(PROMPT)
    greedy = int(np.argmax(model.forward([ids])[0, -1]))
    stopping = polylm.load(checkpoint, backend="torch")
    stopping.tokenizer.eos_ids = (greedy,)  # the greedy next token ends the reply
    with running(stopping) as (url, _):
        plain = complete(url, prompt=ids, max_tokens=1, temperature=0, logprobs=1)["choices"][0]
        echoed = complete(url, prompt=ids, max_tokens=1, temperature=0, logprobs=1, echo=True)
    assert plain["finish_reason"] == "stop" and plain["logprobs"]["tokens"] == []  # unchanged without echo
    choice = echoed["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["text"] == model.tokenizer.decode(ids)
    assert len(choice["logprobs"]["tokens"]) == len(ids) + 1
    assert choice["logprobs"]["tokens"][-1] == model.tokenizer.decode([greedy], skip_special_tokens=False)
    context = 4  # lm-eval's LocalCompletionsAPI.parse_logprobs sums token_logprobs[context:-1]
    assert choice["logprobs"]["token_logprobs"][context:-1] == choice["logprobs"]["token_logprobs"][context:len(ids)]


def test_prompt_logprobs_in_bounded_passes(model):
    ids = model.tokenizer.encode(" ".join([PROMPT, OTHER] * 4))
    whole = prompt_logprobs(model.runtime, ids, 2)
    vocab = model.ir.embedding.vocab_size
    passes = prompt_logprobs(model.runtime, ids, 2, max_pass_logits=7 * vocab)  # 7 tokens a pass
    assert [c.token for c in whole] == [c.token for c in passes] == ids
    np.testing.assert_allclose([c.logprob for c in passes[1:]], [c.logprob for c in whole[1:]], atol=1e-5)
    assert [[t for t, _ in c.top] for c in passes[1:]] == [[t for t, _ in c.top] for c in whole[1:]]
    assert prompt_logprobs(model.runtime, ids[:1], 2)[0].logprob is None


@pytest.mark.parametrize("backend", ["mlx"])  # triton agrees as well (5e-7), at 4 s in its interpreter
def test_prompt_logprobs_on_every_backend(checkpoint, model, backend):
    ids = model.tokenizer.encode(PROMPT)
    other = polylm.load(checkpoint, backend=backend)
    expected = [c.logprob for c in prompt_logprobs(model.runtime, ids, 1)[1:]]
    got = prompt_logprobs(other.runtime, ids, 1, max_pass_logits=5 * model.ir.embedding.vocab_size)
    np.testing.assert_allclose([c.logprob for c in got[1:]], expected, atol=1e-4)


def test_token_offsets_of_split_characters(model):
    tokenizer = model.tokenizer
    ids = tokenizer.encode("Café, naïve — déjà vu! 日本語 🙂🚀 done")
    assert any(tokenizer.decode(ids[:i]).endswith("\ufffd") for i in range(len(ids)))  # some split a character
    assert token_offsets(tokenizer, ids) == [len(tokenizer.decode(ids[:i]).rstrip("\ufffd")) for i in range(len(ids))]


def test_a_prompt_that_cannot_be_scored_fails_alone(served, monkeypatch):
    def broken(runtime, prompt, top):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(engine_module, "prompt_logprobs", broken)
    response = httpx.post(served + "/v1/completions", json={"model": NAME, "prompt": PROMPT, "echo": True,
                                                             "logprobs": 0, "max_tokens": 0}, timeout=60)
    assert response.status_code == 500 and "out of memory" in response.json()["error"]["message"]
    assert complete(served, prompt=PROMPT, max_tokens=2, echo=True)["choices"][0]["text"].startswith(PROMPT)
    assert httpx.get(served + "/health").json()["status"] == "ok"


@pytest.mark.parametrize("body, message", [({"suffix": "x"}, "'suffix' is not supported"),
                                           ({"echo": 1}, "'echo' must be a boolean")])
def test_echo_errors(served, body, message):
    response = httpx.post(served + "/v1/completions", json={"model": NAME, "prompt": PROMPT, **body}, timeout=60)
    assert response.status_code == 400 and message in response.json()["error"]["message"]


# -- lm-evaluation-harness itself ----------------------------------------------------------------------------------

DOCS = [{"question": "Once upon a", "choices": [" time", " dog", " fox"], "answer": 0},
        {"question": "The quick brown", "choices": [" fox", " capital", " model"], "answer": 0},
        {"question": "Paris is the capital of", "choices": [" France", " Germany"], "answer": 0},
        {"question": "def add(a, b):\n    return", "choices": [" a + b", " a - b", " b"], "answer": 0},
        {"question": "Berlin is the capital of", "choices": [" Germany", " France", " fox"], "answer": 0}]
TASK = """task: polylm_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def test_lm_eval_local_completions_equals_hf(served, checkpoint, tmp_path, monkeypatch):
    import lm_eval  # a test dependency (pyproject's `test` extra): missing, this fails rather than skips
    from lm_eval import evaluator
    from lm_eval.tasks import TaskManager

    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.setattr(evaluator, "add_env_info", lambda results: None)  # torch's collect_env: seconds of subprocesses
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in DOCS))
    (tmp_path / "tiny_mc.yaml").write_text(TASK.format(data=tmp_path / "data.jsonl"))
    tasks = TaskManager(include_path=str(tmp_path), include_defaults=False)

    def evaluate(model: str, args: dict) -> tuple[float, list]:
        results = lm_eval.simple_evaluate(model=model, model_args=args, tasks=["polylm_tiny_mc"], task_manager=tasks,
                                          batch_size=1, bootstrap_iters=0, log_samples=True)
        samples = sorted(results["samples"]["polylm_tiny_mc"], key=lambda s: s["doc_id"])
        return results["results"]["polylm_tiny_mc"]["acc,none"], [[r[0] for r in s["resps"]] for s in samples]

    # the hf model's tokenizer adds <s> as this tokenizer.json says; local-completions adds it when told to
    served_acc, served_choices = evaluate("local-completions", {
        "base_url": served + "/v1/completions", "model": NAME, "tokenizer": str(checkpoint),
        "tokenizer_backend": "huggingface", "add_bos_token": True, "max_length": 256, "max_retries": 1})
    hf_acc, hf_choices = evaluate("hf", {"pretrained": str(checkpoint), "dtype": "float32", "device": "cpu"})
    assert served_acc == hf_acc
    assert [len(c) for c in served_choices] == [len(d["choices"]) for d in DOCS]
    for served_doc, hf_doc in zip(served_choices, hf_choices):
        np.testing.assert_allclose([ll for ll, _ in served_doc], [ll for ll, _ in hf_doc], atol=1e-4, rtol=0)
        assert [greedy for _, greedy in served_doc] == [greedy for _, greedy in hf_doc]
