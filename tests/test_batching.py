"""A request in a batch gets what it gets alone: padded batches, continuous batching (joins mid-flight, freed rows
refilled, fresh caches, prefix reuse) on every backend, and per-request sampling checked against transformers."""

import numpy as np
import pytest
import torch

import checkpoints
import polylm
from polylm.errors import InputError
from polylm.generate.sampling import Sampler, Sampling, adjust_scores, log_softmax
from polylm.generate.scheduler import Scheduler
from test_parity import BACKENDS

PROMPTS = [[1, 5, 9, 44, 21], [1, 70], [1, 33, 2, 8, 9, 10, 11, 12]]


@pytest.fixture(scope="module")
def loaded():
    cache = {}

    def load(directory, backend):
        key = (str(directory), backend)
        if key not in cache:
            cache[key] = polylm.load(directory, backend=backend)
        return cache[key]
    return load


_ALONE: dict = {}


def alone(model, prompt, new_tokens, **sampling):
    """What `prompt` gives when it is the only request (remembered: the Triton interpreter is slow)."""
    key = (id(model), tuple(prompt), new_tokens, tuple(sorted(sampling.items())))
    if key not in _ALONE:
        scheduler = Scheduler(model.runtime, max_batch=1, eos_ids=model.tokenizer.eos_ids)
        request = scheduler.submit(prompt, Sampling(new_tokens, **sampling))
        run(scheduler)
        _ALONE[key] = (model, request.tokens)  # the model is kept so that its id is not reused
    return _ALONE[key][1]


def run(scheduler, steps=None):
    count = 0
    while scheduler.busy and (steps is None or count < steps):
        scheduler.step()
        count += 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", checkpoints.FAMILIES)
def test_padded_batch_equals_one_at_a_time(make_ckpt, loaded, family, backend):
    model = loaded(make_ckpt(family), backend)
    batched = model.generate(PROMPTS, max_new_tokens=5)
    assert batched == [alone(model, p, 5) for p in PROMPTS]
    assert sum(map(len, batched)) >= 5  # not all cut short by eos


#: The continuous-batching scenario runs on every backend for one RoPE and one ALiBi family (the Triton
#: interpreter is slow), and for every family on the others.
CONTINUOUS = [(f, b) for b in BACKENDS for f in checkpoints.FAMILIES if b != "triton" or f in ("gemma", "bloom")]


@pytest.mark.parametrize("family,backend", CONTINUOUS)
def test_continuous_batching_equals_one_at_a_time(make_ckpt, loaded, family, backend):
    """Two rows, five requests: one joins mid-flight (the running row gets masked slots), a chat-like follow-up
    takes its finished predecessor's row and reuses its prefix, the others wait for free rows, and the cache
    fills up, drains and starts afresh."""
    model = loaded(make_ckpt(family), backend)
    first = alone(model, PROMPTS[0], 5)
    follow_up = PROMPTS[0] + first[:4] + [17, 18]
    scheduler = Scheduler(model.runtime, max_batch=2, capacity=24, eos_ids=model.tokenizer.eos_ids, min_prefix=3)
    a = scheduler.submit(PROMPTS[0], Sampling(5))
    run(scheduler, steps=2)
    b = scheduler.submit(PROMPTS[2], Sampling(5))
    while not a.finished:
        scheduler.step()
    assert b.row is not None and not b.finished
    late = [(follow_up, 3), (PROMPTS[1], 5), ([1, 200, 201], 4)]
    d, c, e = [scheduler.submit(prompt, Sampling(n)) for prompt, n in late]
    run(scheduler)
    assert [r.tokens for r in (a, b, d, c, e)] == [first, alone(model, PROMPTS[2], 5)] + [alone(model, p, n)
                                                                                          for p, n in late]
    assert all(r.finish_reason in ("stop", "length") for r in (a, b, c, d, e))
    assert d.reused_tokens == len(PROMPTS[0]) + 4  # the prompt and the reply's fed tokens
    assert scheduler.stats.caches == 2  # the cache overflowed, drained and was replaced


@pytest.mark.parametrize("family", ["gemma", "bloom"])
def test_requests_outgrowing_a_full_cache_move_on_and_rows_follow_demand(make_ckpt, loaded, family):
    """A fixed-size cache too small for the requests: the long one fills it and continues in a fresh one by
    recomputing its tokens; with `min_batch` the rows grow when requests queue up (the running request moves to
    the larger cache), and shrink when idle."""
    model = loaded(make_ckpt(family), "torch")
    scheduler = Scheduler(model.runtime, max_batch=4, min_batch=1, capacity=24, eos_ids=(), min_prefix=None)
    long = scheduler.submit(PROMPTS[0], Sampling(30))
    run(scheduler, steps=2)
    assert scheduler.rows == 1  # one request: one row
    jobs = [(PROMPTS[1], 6), (PROMPTS[2], 8), ([1, 9, 9], 5)]
    others = [scheduler.submit(p, Sampling(n)) for p, n in jobs]
    run(scheduler, steps=1)
    assert scheduler.rows == 4 and long.row is not None and all(r.row is not None for r in others)
    assert scheduler.stats.moved == 1 and scheduler.stats.recomputed_tokens == len(PROMPTS[0]) + 2
    run(scheduler)
    assert long.tokens == alone(model, PROMPTS[0], 30)
    assert [r.tokens for r in others] == [alone(model, p, n) for p, n in jobs]
    assert scheduler.stats.moved >= 2 and scheduler.stats.caches >= 3  # and again when the 24 slots ran out

    roomy = Scheduler(model.runtime, max_batch=2, min_batch=1, capacity=200, eos_ids=(), min_prefix=4)
    first = [roomy.submit(p, Sampling(3)) for p in PROMPTS[:2]]
    run(roomy)
    assert roomy.rows == 2
    long = roomy.submit([1, 2, 3, 4, 5], Sampling(70))  # outlasts the memory of the busy spell
    run(roomy)
    follow = roomy.submit(long.prompt + long.tokens[:10], Sampling(3))
    run(roomy)
    assert roomy.rows == 2 and follow.reused_tokens == 14  # kept: the cache held its prefix (the last token is fed)
    alone_again = roomy.submit([1, 77], Sampling(3))
    run(roomy)
    assert roomy.rows == 1 and roomy.stats.caches == 2  # shrank: nothing to reuse, one request
    assert [r.tokens for r in first + [follow, alone_again]] == \
        [alone(model, r.prompt, 3) for r in first + [follow, alone_again]]


def test_prefix_reuse_gives_the_same_tokens_and_computes_fewer(make_ckpt, loaded):
    """A chat's second turn and requests sharing a system prompt: identical tokens, fewer prompt tokens computed."""
    model = loaded(make_ckpt("gemma"), "torch")
    system = [1] + list(range(40, 60))

    def conversation(min_prefix):
        scheduler = Scheduler(model.runtime, max_batch=2, capacity=200, eos_ids=(), min_prefix=min_prefix)
        turn = scheduler.submit(system + [60, 61], Sampling(6))
        run(scheduler)
        follow = scheduler.submit(turn.prompt + turn.tokens + [70, 71, 72], Sampling(6))
        run(scheduler)
        shared = [scheduler.submit(system + [80 + i], Sampling(4)) for i in range(3)]
        run(scheduler)
        requests = [turn, follow, *shared]
        return [r.tokens for r in requests], [r.reused_tokens for r in requests], scheduler.stats

    with_reuse, reused, stats = conversation(min_prefix=8)
    without, no_reuse, baseline = conversation(min_prefix=None)
    assert with_reuse == without
    assert no_reuse == [0] * 5
    assert reused[0] == 0 and reused[1] == len(system) + 2 + 5  # prompt and all replies but the last token fed
    assert sum(reused) > reused[1]  # a shared-system-prompt request reused too
    assert stats.prompt_tokens == baseline.prompt_tokens - sum(reused)
    assert stats.prompt_tokens < baseline.prompt_tokens / 2


def test_scheduler_edges(make_ckpt, loaded):
    model = loaded(make_ckpt("helium"), "torch")
    scheduler = Scheduler(model.runtime, max_batch=1, eos_ids=())
    with pytest.raises(InputError, match="300 tokens exceeds the model's context of 256"):
        scheduler.submit([1] * 300, Sampling(4))
    nothing = scheduler.submit([1, 5], Sampling(0))
    at_limit = scheduler.submit([1] * 250, Sampling(20))  # the context leaves room for 6
    waiting = scheduler.submit([1, 7], Sampling(20))
    outputs = scheduler.step()
    assert nothing.finish_reason == "length" and nothing.tokens == [] and outputs[0].request is nothing
    scheduler.cancel(waiting)
    run(scheduler)
    assert waiting.finish_reason == "cancelled" and waiting.tokens == []
    assert at_limit.finish_reason == "length" and len(at_limit.tokens) == 6
    running = scheduler.submit([1, 9], Sampling(50))
    run(scheduler, steps=3)
    scheduler.cancel(running, "stop")
    assert running.finish_reason == "stop" and len(running.tokens) == 3 and not scheduler.busy


# -- sampling --------------------------------------------------------------------------------------------------


def _hf_scores(logits, seen_ids, sampling):
    """transformers' processors in the order its `generate` applies them."""
    from transformers.generation import logits_process as lp

    chain = []
    if sampling.repetition_penalty != 1.0:
        chain.append(lp.RepetitionPenaltyLogitsProcessor(sampling.repetition_penalty))
    if not sampling.greedy:
        chain.append(lp.TemperatureLogitsWarper(sampling.temperature))
        if sampling.top_k:
            chain.append(lp.TopKLogitsWarper(sampling.top_k))
        if sampling.top_p is not None:
            chain.append(lp.TopPLogitsWarper(sampling.top_p))
        if sampling.min_p is not None:
            chain.append(lp.MinPLogitsWarper(sampling.min_p))
    scores, ids = torch.tensor(logits), torch.tensor(seen_ids)
    for processor in chain:
        scores = processor(ids, scores)
    return scores.double().numpy()


@pytest.mark.parametrize("sampling", [
    Sampling(temperature=0.0, repetition_penalty=1.3),
    Sampling(temperature=1.0, min_p=0.1),
    Sampling(temperature=0.7, min_p=0.05, repetition_penalty=1.2),
    Sampling(temperature=1.3, top_k=12, top_p=0.8, min_p=0.02, repetition_penalty=0.8),
    Sampling(temperature=0.5, top_p=0.5),
], ids=["greedy-penalty", "min-p", "min-p-penalty", "all", "top-p"])
def test_scores_match_transformers_processors(sampling):
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((4, 64)) * 3).astype(np.float32)
    seen_ids = rng.integers(0, 64, (4, 10))
    seen = np.zeros(logits.shape, dtype=bool)
    np.put_along_axis(seen, seen_ids, True, axis=1)
    ours, theirs = adjust_scores(logits, sampling, seen), _hf_scores(logits, seen_ids, sampling)
    assert (np.isinf(ours) == np.isinf(theirs)).all()
    finite = np.isfinite(ours)
    np.testing.assert_allclose(ours[finite], theirs[finite], rtol=1e-5)
    assert np.isfinite(ours).sum(axis=1).min() >= 1


def test_greedy_repetition_penalty_matches_transformers_generate(make_ckpt, loaded):
    model = loaded(make_ckpt("arcee"), "torch")
    hf = checkpoints.hf_model("arcee")
    prompt = [1, 5, 9, 44, 21]
    expected = hf.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, repetition_penalty=1.5,
                           eos_token_id=2, pad_token_id=0)[0, len(prompt):].tolist()
    expected = expected[:expected.index(2)] if 2 in expected else expected
    assert model.generate(prompt, max_new_tokens=10, repetition_penalty=1.5) == expected
    assert model.generate([prompt, [1, 70]], max_new_tokens=10, repetition_penalty=1.5)[0] == expected


def test_per_request_settings_and_seeds_sample_as_alone(make_ckpt, loaded):
    model = loaded(make_ckpt("helium"), "torch")
    settings = [Sampling(12, temperature=1.0, seed=1), Sampling(12, temperature=0.7, top_k=20, seed=2),
                Sampling(12, repetition_penalty=1.5), Sampling(12, temperature=1.2, min_p=0.1, seed=3),
                Sampling(12, temperature=1.0, top_p=0.9, seed=1)]
    prompts = [[1, 5, 9], [1, 70, 71, 72, 73], [1, 33], [1, 8, 8, 8, 8, 8, 8], [1, 5, 9]]
    scheduler = Scheduler(model.runtime, max_batch=3, eos_ids=())
    requests = [scheduler.submit(p, s) for p, s in zip(prompts, settings)]
    run(scheduler)
    expected = [alone(model, p, 12, **{k: getattr(s, k) for k in ("temperature", "top_k", "top_p", "seed", "min_p",
                                                                     "repetition_penalty")})
                for p, s in zip(prompts, settings)]
    assert [r.tokens for r in requests] == expected
    assert len({tuple(r.tokens) for r in requests}) == len(requests)
    assert model.generate([[1, 5, 9], [1, 5, 9]], max_new_tokens=8, temperature=1.0, seed=4) == \
        [model.generate([1, 5, 9], max_new_tokens=8, temperature=1.0, seed=4)] * 2


def test_logprobs_are_the_model_distribution(make_ckpt, loaded):
    model = loaded(make_ckpt("bloom"), "torch")
    prompt = [1, 5, 9, 44]
    scheduler = Scheduler(model.runtime, max_batch=2, eos_ids=())
    other = scheduler.submit([1, 70, 71, 72, 73, 74, 75], Sampling(3))
    request = scheduler.submit(prompt, Sampling(3, logprobs=4))
    choices = []
    while scheduler.busy:
        choices += [out.choice for out in scheduler.step() if out.request is request]
    assert len(choices) == 3 and len(other.tokens) == 3
    expected = log_softmax(model.forward([prompt + request.tokens[:2]])[0])
    for position, choice in zip(range(len(prompt) - 1, len(prompt) + 2), choices):
        row = expected[position]
        assert choice.logprob == pytest.approx(row[choice.token], abs=1e-4)
        assert [t for t, _ in choice.top] == list(np.argsort(-row, kind="stable")[:4])
        assert [lp for _, lp in choice.top] == sorted((lp for _, lp in choice.top), reverse=True)
        assert choice.top[0][0] == choice.token  # greedy: the chosen token is the most likely one


def test_sampler_without_logprobs_reports_none():
    choice = Sampler(Sampling()).pick(np.array([0.1, 2.0, -1.0], dtype=np.float32))
    assert choice.token == 1 and choice.logprob is None and choice.top == ()
