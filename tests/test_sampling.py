"""Sampling is numerically safe for extreme but legal settings and logits, and a model whose logits leave no token
to pick fails with a typed `GenerationError` (in the library; the server fails only that request)."""

import shutil

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import polylm
from polylm.errors import GenerationError
from polylm.generate.sampling import Sampler, Sampling, adjust_scores, log_softmax, penalise
from polylm.numerics.logits import top_rows


def picks(sampling: Sampling, logits, draws: int = 400, seen=()) -> np.ndarray:
    sampler = Sampler(sampling, seen)
    return np.bincount([sampler.pick(np.asarray(logits, dtype=np.float32)).token for _ in range(draws)],
                       minlength=len(logits))


def test_a_vanishing_temperature_picks_the_best_tokens():
    logits = [3.0, 30.0, 29.999, -1e30, 30.0]
    for temperature in (1e-320, 5e-324, 1e-300, 1e-30):
        counts = picks(Sampling(temperature=temperature, seed=0), logits)
        assert counts[[0, 2, 3]].sum() == 0 and min(counts[1], counts[4]) > 150, (temperature, counts)
    assert picks(Sampling(temperature=1e-320, seed=0), [2.0] * 4).min() > 70  # all equal: uniform


def test_extreme_penalties_and_infinite_logits_give_no_nan():
    logits = np.array([1.0, -2.0, 5.0, 0.5])
    seen = np.array([0, 1])
    tiny = penalise(logits, seen, 1e-320)
    assert tiny[0] == np.finfo(np.float64).max and tiny[1] == pytest.approx(-2e-320, abs=1e-322)
    huge = penalise(logits, seen, 1e308)
    assert huge[1] == -np.finfo(np.float64).max and tiny[2] == huge[2] == 5.0
    assert picks(Sampling(temperature=1.0, repetition_penalty=1e-320, seed=1), [1.0, -2.0, 5.0], seen=[0])[0] == 400
    with_inf = [np.inf, 1.0, np.inf, -np.inf]
    counts = picks(Sampling(temperature=0.7, top_p=0.9, min_p=0.1, seed=2), with_inf)
    assert counts[1] == counts[3] == 0 and min(counts[0], counts[2]) > 150  # +inf logits share the probability
    np.testing.assert_allclose(np.exp(log_softmax(np.array(with_inf))), [0.5, 0, 0.5, 0])
    sampler = Sampler(Sampling(logprobs=2))
    choice = sampler.pick(np.array(with_inf, dtype=np.float32))
    assert choice.token == 0 and choice.logprob == pytest.approx(np.log(0.5)) and len(choice.top) == 2


@pytest.mark.parametrize("logits", [[1.0, np.nan, 2.0], [-np.inf] * 3], ids=["nan", "all-neg-inf"])
@pytest.mark.parametrize("sampling", [Sampling(), Sampling(temperature=1.0), Sampling(repetition_penalty=1.2)],
                         ids=["greedy", "sampled", "penalised"])
def test_logits_leaving_no_token_raise_generation_error(logits, sampling):
    with pytest.raises(GenerationError, match="no token can be picked"):
        Sampler(sampling, [0]).pick(np.array(logits, dtype=np.float32))


def test_generate_with_extreme_settings_and_with_nan_weights(make_ckpt, tmp_path):
    source = make_ckpt("helium")
    model = polylm.load(source, backend="torch")
    greedy = model.generate("Once upon", max_new_tokens=6)
    assert model.generate("Once upon", max_new_tokens=6, temperature=1e-310) == greedy
    assert model.generate("Once upon", max_new_tokens=6, temperature=5e-324, top_k=3, top_p=1e-300, min_p=1.0) == greedy
    for penalty in (1e-320, 1e300):
        assert isinstance(model.generate("Once upon", max_new_tokens=6, temperature=1.0, seed=0,
                                         repetition_penalty=penalty), str)
    broken = tmp_path / "nan"
    shutil.copytree(source, broken)
    tensors = load_file(broken / "model.safetensors")
    # a NaN matrix (the load refuses non-finite norm weights and biases, but reads no matrix to check it)
    tensors["lm_head.weight"] = np.full_like(tensors["lm_head.weight"], np.nan)
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    nan_model = polylm.load(broken, backend="torch")
    for options in ({}, {"temperature": 1.0, "seed": 0}):
        with pytest.raises(GenerationError, match="logits hold NaN"):
            nan_model.generate("Once upon", max_new_tokens=3, **options)


def nucleus_by_full_sort(scores: np.ndarray, top_p: float) -> set[int]:
    """transformers' top-p rule spelled out over the whole sorted vocabulary (equal scores by lowest id)."""
    weights = np.exp(scores - scores.max())
    order = np.lexsort((np.arange(len(scores)), -weights))
    before = np.concatenate([[0.0], np.cumsum(weights[order])[:-1]]) / weights.sum()
    return set(order[before < top_p].tolist())


@pytest.mark.parametrize("vocab", [5, 300, 50_000])
@pytest.mark.parametrize("spread", [0.3, 3.0, 30.0])
def test_top_p_without_a_full_sort_keeps_the_same_nucleus(vocab, spread):
    rng = np.random.default_rng(vocab)
    for top_p in (1e-9, 0.3, 0.9, 0.999999):
        logits = (rng.standard_normal(vocab) * spread).astype(np.float32)
        logits[: vocab // 3] = np.round(logits[: vocab // 3])  # equal scores, some at the nucleus' edge
        kept = np.isfinite(adjust_scores(logits[None], Sampling(temperature=1.0, top_p=top_p))[0])
        assert set(np.flatnonzero(kept).tolist()) == nucleus_by_full_sort(logits.astype(np.float64), top_p)


@pytest.mark.parametrize("sampling", [
    Sampling(temperature=0.8, top_k=40, seed=5),
    Sampling(temperature=1.3, top_k=7, top_p=0.6, seed=6, logprobs=3),
    Sampling(temperature=0.5, top_k=100, min_p=0.05, seed=7),
    Sampling(temperature=1.0, top_k=3, seed=8, logprobs=20),
], ids=["top-k", "top-p", "min-p", "logprobs"])
def test_top_k_sampling_from_the_top_logits_picks_as_from_the_whole_row(sampling):
    """A top-k sampler reads only the runtime's top outputs (`pick_top`) and still draws exactly what it draws
    from the whole row, with bf16 logits full of equal values at the k-th."""
    rng = np.random.default_rng(0)
    logits = torch.tensor(rng.standard_normal((30, 4000)) * 4).to(torch.bfloat16).float().numpy()
    whole, top = Sampler(sampling), Sampler(sampling)
    assert not top.needs_full and top.top == max(sampling.top_k, sampling.logprobs or 0)
    picked = set()
    for row in logits:
        ids, values, norm, nan = (a[0] for a in top_rows(row[None], top.top))
        a, b = whole.pick(row), top.pick_top(ids, values, norm, nan)
        assert a.token == b.token and [t for t, _ in a.top] == [t for t, _ in b.top]
        np.testing.assert_allclose([p for _, p in a.top], [p for _, p in b.top], rtol=0, atol=1e-6)
        assert (a.logprob is None and b.logprob is None) or abs(a.logprob - b.logprob) <= 1e-6
        picked.add(a.token)
    assert len(picked) > 10
