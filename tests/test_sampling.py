"""Sampling is numerically safe for extreme but legal settings and logits, and a model whose logits leave no token
to pick fails with a typed `GenerationError` (in the library; the server fails only that request)."""

import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import polylm
from polylm.errors import GenerationError
from polylm.generate.sampling import Sampler, Sampling, adjust_scores, log_softmax


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
    logits = np.array([[1.0, -2.0, 5.0, 0.5]])
    seen = np.array([[True, True, False, False]])
    tiny = adjust_scores(logits, Sampling(temperature=1.0, repetition_penalty=1e-320), seen)
    assert tiny[0, 0] == np.finfo(np.float64).max and tiny[0, 1] == pytest.approx(-2e-320, abs=1e-322)
    huge = adjust_scores(logits, Sampling(temperature=1.0, repetition_penalty=1e308), seen)
    assert huge[0, 1] == -np.finfo(np.float64).max and tiny[0, 2] == huge[0, 2] == 5.0
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
