"""How one sequence picks its tokens: sampling settings with transformers' meaning, and a per-sequence sampler
with its own random generator and log-probabilities."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import GenerationError, InputError

#: The most top alternatives a token's logprobs may list (OpenAI's limit).
MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class Sampling:
    """How one sequence picks tokens, with transformers' meaning for each setting.

    temperature 0 is greedy; top_k None/0, top_p None/1.0, min_p None/0 and repetition_penalty 1.0 switch those
    off. `seed` seeds this sequence's own random generator, so it samples the same in a batch as alone.
    `logprobs` None reports no log-probabilities; n ≥ 0 reports each token's and its n most likely alternatives.

    Every legal value is numerically safe. Scores are float64; a temperature so small that dividing would
    overflow divides scores shifted so that the best is 0 instead, so sampling tends to a uniform pick among the
    best tokens (not NaN) as the temperature tends to 0; an extreme repetition penalty saturates at ±the largest
    float64; +inf logits share all the probability. Logits holding NaN, or -inf for every token, raise
    `GenerationError`.
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0
    logprobs: int | None = None

    def __post_init__(self) -> None:
        _check_int(self.max_new_tokens, "max_new_tokens", minimum=0)
        if not _is_number(self.temperature) or self.temperature < 0:
            raise InputError(f"temperature must be a number ≥ 0, got {self.temperature!r}")
        if self.top_k is not None:
            _check_int(self.top_k, "top_k", minimum=0)
        if self.top_p is not None and (not _is_number(self.top_p) or not 0 < self.top_p <= 1):
            raise InputError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.min_p is not None and (not _is_number(self.min_p) or not 0 <= self.min_p <= 1):
            raise InputError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if not _is_number(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise InputError(f"repetition_penalty must be a number > 0, got {self.repetition_penalty!r}")
        if self.seed is not None:
            _check_int(self.seed, "seed", minimum=0)
        if self.logprobs is not None:
            _check_int(self.logprobs, "logprobs", minimum=0)
            if self.logprobs > MAX_TOP_LOGPROBS:
                raise InputError(f"logprobs must be at most {MAX_TOP_LOGPROBS}, got {self.logprobs}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_int(value: object, name: str, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise InputError(f"{name} must be an integer ≥ {minimum}, got {value!r}")


def adjust_scores(logits: np.ndarray, sampling: Sampling, seen: np.ndarray | None = None) -> np.ndarray:
    """The scores [batch, vocab] (float64) tokens are picked from, as transformers' logits processors make them.

    In transformers' order: the repetition penalty on the tokens `seen` ([batch, vocab] bool: the prompt and
    what was generated); then, when sampling, temperature, top-k, top-p and min-p, each setting the scores of
    the tokens it removes to -inf. Greedy picking reads only the penalty, as transformers' does.
    """
    scores = np.array(logits, dtype=np.float64)
    penalty = sampling.repetition_penalty
    if penalty != 1.0 and seen is not None:
        with np.errstate(over="ignore", under="ignore"):
            penalised = np.where(scores < 0, scores * penalty, scores / penalty)
        penalised = np.where(np.isfinite(scores), np.clip(penalised, -_LARGEST, _LARGEST), penalised)
        scores = np.where(seen, penalised, scores)
    if sampling.greedy:
        return scores
    if sampling.temperature != 1.0:
        scores = _divide(scores, sampling.temperature)
    if sampling.top_k:
        k = min(sampling.top_k, scores.shape[-1])
        kth = np.partition(scores, -k, axis=-1)[:, -k][:, None]
        scores = np.where(scores < kth, -np.inf, scores)
    if sampling.top_p is not None and sampling.top_p < 1:
        # drop the least likely tokens while their total mass stays ≤ 1 - top_p; the most likely always stays
        order = np.argsort(scores, axis=-1, kind="stable")
        ascending = _softmax(np.take_along_axis(scores, order, axis=-1))
        drop_sorted = np.cumsum(ascending, axis=-1) <= 1 - sampling.top_p
        drop_sorted[:, -1] = False
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, axis=-1)
        scores = np.where(drop, -np.inf, scores)
    if sampling.min_p:
        probs = _softmax(scores)
        drop = probs < sampling.min_p * probs.max(axis=-1, keepdims=True)
        np.put_along_axis(drop, probs.argmax(axis=-1)[:, None], False, axis=-1)
        scores = np.where(drop, -np.inf, scores)
    return scores


_LARGEST = np.finfo(np.float64).max


def _shifted(scores: np.ndarray) -> np.ndarray:
    """`scores` less each row's best, so the best is 0; in a row with +inf scores, those are 0 and the rest -inf.
    Every row needs a score above -inf."""
    best = scores.max(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore"):
        shifted = scores - best
    return np.where(np.isposinf(best), np.where(np.isposinf(scores), 0.0, -np.inf), shifted)


def _divide(scores: np.ndarray, temperature: float) -> np.ndarray:
    """`scores / temperature`; when that overflows, the shifted scores divided, so the best stay apart from the
    rest instead of all becoming +inf."""
    with np.errstate(over="ignore"):
        divided = scores / temperature
    if np.isposinf(divided[np.isfinite(scores)]).any():
        with np.errstate(over="ignore"):
            divided = _shifted(scores) / temperature
    return divided


def _softmax(scores: np.ndarray) -> np.ndarray:
    probs = np.exp(_shifted(scores))
    return probs / probs.sum(axis=-1, keepdims=True)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Log-probabilities (float64) over the last axis (+inf logits share all the probability)."""
    shifted = _shifted(np.asarray(logits, dtype=np.float64))
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def check_logits(best: float) -> None:
    """Raise unless `best`, the largest logit (NaN when any is), leaves a token to pick."""
    if math.isnan(best):
        raise GenerationError("the model's logits hold NaN (broken weights, or an overflow in the forward pass); "
                              "no token can be picked")
    if best == -math.inf:
        raise GenerationError("every token's logit is -inf; no token can be picked")


@dataclass(frozen=True)
class TokenChoice:
    """A picked token; with logprobs asked for, its log-probability under the model (the raw logits, before any
    sampling setting) and the `top` most likely tokens as (id, logprob), most likely first."""

    token: int
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] = ()


def scored_choice(logprobs: np.ndarray, token: int, top: int) -> TokenChoice:
    """`token` with its log-probability in `logprobs` [vocab] and the `top` most likely tokens."""
    count = min(top, logprobs.shape[-1])
    best = np.argpartition(-logprobs, count - 1)[:count] if count else np.zeros(0, dtype=np.int64)
    best = best[np.argsort(-logprobs[best], kind="stable")]
    return TokenChoice(token, float(logprobs[token]), tuple((int(t), float(logprobs[t])) for t in best))


class Sampler:
    """Picks one sequence's tokens: its `Sampling`, its own random generator, and the tokens it has seen (for
    the repetition penalty), so the sequence samples the same whatever batch it runs in."""

    def __init__(self, sampling: Sampling, prompt: Sequence[int] = ()) -> None:
        self.sampling = sampling
        self.rng = np.random.default_rng(sampling.seed)
        self._seen: set[int] | None = set(prompt) if sampling.repetition_penalty != 1.0 else None
        self._plain_greedy = sampling.greedy and self._seen is None

    def pick(self, logits: np.ndarray) -> TokenChoice:
        """The next token from this sequence's logits [vocab]; `GenerationError` when they leave none to pick."""
        if self._plain_greedy:
            token = int(np.argmax(logits))  # the first NaN, if there is one
            check_logits(float(logits[token]))
        else:
            check_logits(float(np.max(logits)))
            scores = adjust_scores(logits[None], self.sampling, self._seen_mask(logits.shape[-1]))[0]
            if self.sampling.greedy:
                token = int(np.argmax(scores))
            else:
                probs = _softmax(scores)
                token = int(self.rng.choice(probs.shape[-1], p=probs))
            if self._seen is not None:
                self._seen.add(token)
        if self.sampling.logprobs is None:
            return TokenChoice(token)
        return scored_choice(log_softmax(logits), token, self.sampling.logprobs)

    @property
    def needs_full(self) -> bool:
        """Whether picking needs the whole row of logits (sampling, the repetition penalty), not only the top."""
        return not self._plain_greedy

    @property
    def top(self) -> int:
        """How many of the largest logits `pick_top` reads."""
        return max(1, self.sampling.logprobs or 0)

    def pick_top(self, ids: np.ndarray, values: np.ndarray, norm: float, nan: bool) -> TokenChoice:
        """As `pick` for a sequence that does not need the whole row: from its `top` largest logits (`ids`, largest
        first, ties by lowest id; their `values`), the log-normalizer log Σ exp(logits − max) and whether the row
        holds NaN (see `polylm.backend.Reduced`)."""
        check_logits(math.nan if nan else float(values[0]))
        token = int(ids[0])
        if self.sampling.logprobs is None:
            return TokenChoice(token)
        logprobs = _shifted(values[None].astype(np.float64))[0] - norm
        count = min(self.sampling.logprobs, len(ids))
        return TokenChoice(token, float(logprobs[0]),
                           tuple((int(t), float(p)) for t, p in zip(ids[:count], logprobs[:count])))

    def _seen_mask(self, vocab: int) -> np.ndarray | None:
        if self._seen is None:
            return None
        mask = np.zeros((1, vocab), dtype=bool)
        ids = np.fromiter((t for t in self._seen if 0 <= t < vocab), dtype=np.int64)
        mask[0, ids] = True
        return mask
