"""Sampling settings, stop strings and UTF-8-safe streaming — backend-independent generation code."""

import numpy as np
import pytest

import polylm
from polylm.generate.sampling import Sampler, Sampling
from polylm.generate.stream import TextStream


@pytest.fixture(scope="module")
def model(make_ckpt):
    return polylm.load(make_ckpt("helium"), backend="torch")


def test_multibyte_characters_never_split(model):
    tokenizer = model.tokenizer
    text = "a€𝄞b🙂"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > len(text)  # some characters really span several tokens
    stream = TextStream(tokenizer)
    pieces = [stream.push(i) for i in ids] + [stream.finish()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text


def test_stopping_inside_a_character_drops_it(model):
    tokenizer = model.tokenizer
    ids = tokenizer.encode("x𝄞", add_special_tokens=False)
    stream = TextStream(tokenizer)
    pieces = [stream.push(i) for i in ids[:-1]] + [stream.finish()]
    assert "".join(pieces) == "x"


def test_stop_string_across_tokens_is_not_emitted(model):
    tokenizer = model.tokenizer
    text = "The quick brown fox jumps"
    ids = tokenizer.encode(text, add_special_tokens=False)
    stream = TextStream(tokenizer, stop=["brown f"])
    out = ""
    for i in ids:
        out += stream.push(i)
        if stream.stopped:
            break
    out += stream.finish()
    assert out == "The quick " and stream.stopped


def test_generate_stop_string_and_stream_agree(model):
    full = model.generate("Once upon", max_new_tokens=12)
    assert len(full) > 2
    stop = full[2:4]
    cut = model.generate("Once upon", max_new_tokens=12, stop=stop)
    assert cut == full[:full.index(stop)]
    assert "".join(model.generate("Once upon", max_new_tokens=12, stream=True)) == full


def test_seeded_sampling_is_reproducible_and_differs_from_greedy(model):
    a = model.generate([1, 5, 9], max_new_tokens=10, temperature=1.5, seed=7)
    b = model.generate([1, 5, 9], max_new_tokens=10, temperature=1.5, seed=7)
    assert a == b
    runs = {tuple(model.generate([1, 5, 9], max_new_tokens=10, temperature=1.5, seed=s)) for s in range(5)}
    assert len(runs) > 1


def test_top_k_one_is_greedy(model):
    greedy = model.generate([1, 5, 9], max_new_tokens=8)
    assert model.generate([1, 5, 9], max_new_tokens=8, temperature=0.9, top_k=1, seed=3) == greedy


def test_top_p_keeps_the_smallest_nucleus():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    sampler = Sampler(Sampling(temperature=1.0, top_p=0.7, seed=0))
    picks = {sampler.pick(logits[0]).token for _ in range(200)}
    assert picks == {0, 1}


def test_top_k_filters():
    logits = np.log(np.array([[0.4, 0.3, 0.2, 0.1]]))
    sampler = Sampler(Sampling(temperature=1.0, top_k=2, seed=0))
    picks = {sampler.pick(logits[0]).token for _ in range(200)}
    assert picks == {0, 1}


def test_batch_equals_one_at_a_time(model):
    prompts = [[1, 5, 9, 44, 21], [1, 70], [1, 33, 2, 8, 9, 10, 11]]
    batched = model.generate(prompts, max_new_tokens=10)
    assert batched == [model.generate(p, max_new_tokens=10) for p in prompts]
    texts = ["Once upon a time", "Paris"]
    assert model.generate(texts, max_new_tokens=6) == [model.generate(t, max_new_tokens=6) for t in texts]


def test_zero_new_tokens(model):
    assert model.generate([1, 5], max_new_tokens=0) == []
    assert model.generate("hi", max_new_tokens=0) == ""
