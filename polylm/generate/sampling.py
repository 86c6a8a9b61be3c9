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
#: The largest top-k sampled from the runtime's top logits alone (`Runtime.forward_top`); larger ones read the
#: whole row.
MAX_TOP_K_FROM_TOP = 256


@dataclass(frozen=True)
class Sampling:
    """How one sequence picks tokens, with transformers' meaning for each setting.

    temperature 0 is greedy; top_k None/0, top_p None/1.0, min_p None/0 and repetition_penalty 1.0 switch those
    off. Equal logits are ordered by lowest id, as greedy picks: top-k keeps exactly k tokens (as vLLM and
    llama.cpp; transformers keeps every token equal to the k-th), and top-p's nucleus ends at one token. `seed`
    seeds this sequence's own random generator, so it samples the same in a batch as alone.
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


def penalise(scores: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """A copy of `scores` [vocab] (float64) with transformers' repetition penalty on the ids `seen`: a positive
    score divided by `penalty`, a negative one multiplied, saturating at ±the largest float64."""
    scores = scores.copy()
    picked = scores[seen]
    with np.errstate(over="ignore", under="ignore"):
        penalised = np.where(picked < 0, picked * penalty, picked / penalty)
    scores[seen] = np.where(np.isfinite(picked), np.clip(penalised, -_LARGEST, _LARGEST), penalised)
    return scores


def adjust_scores(logits: np.ndarray, sampling: Sampling, seen: np.ndarray | None = None) -> np.ndarray:
    """The scores [batch, vocab] (float64) a `Sampler` draws from, removed tokens at -inf, as transformers' logits
    processors make them (its order: the repetition penalty on the tokens `seen` [batch, vocab] bool; then, when
    sampling, temperature, top-k, top-p and min-p). `Sampler` reaches the same tokens from the same pieces
    without whole-vocabulary arrays; this spells them out, to compare with transformers."""
    rows = []
    for row, scores in enumerate(np.array(logits, dtype=np.float64)):
        if sampling.repetition_penalty != 1.0 and seen is not None:
            scores = penalise(scores, np.flatnonzero(seen[row]), sampling.repetition_penalty)
        if not sampling.greedy:
            ids = top_k_ids(scores, sampling.top_k) if sampling.top_k else np.arange(len(scores))
            index, kept = _candidates(scores[ids], sampling)
            scores = np.full_like(scores, -np.inf)
            scores[ids if index is None else ids[index]] = kept
        rows.append(scores)
    return np.stack(rows)


def top_k_ids(scores: np.ndarray, k: int) -> np.ndarray:
    """The ids (ascending) of the `k` largest of `scores` [vocab], equal scores by lowest id, as the runtimes'
    `Runtime.forward_top` takes them."""
    n = scores.shape[-1]
    if k >= n:
        return np.arange(n)
    kth = np.partition(scores, n - k)[n - k]
    above = np.flatnonzero(scores > kth)
    tied = np.flatnonzero(scores == kth)[:k - len(above)]
    return np.sort(np.concatenate([above, tied]))


def _candidates(scores: np.ndarray, sampling: Sampling) -> tuple[np.ndarray | None, np.ndarray]:
    """Temperature, top-p and min-p on the scores [n] (float64) of the tokens top-k left (or of all): the indices
    (ascending; None: all) of the tokens they leave and those tokens' scores.

    Top-p keeps, most likely first (equal ones by lowest id), each token whose more likely tokens hold less than
    `top_p` of the probability — transformers' rule, found without sorting the whole vocabulary. Min-p removes
    the tokens less likely than `min_p` times the most likely one."""
    if sampling.temperature != 1.0:
        scores = _divide(scores, sampling.temperature)
    index = None
    if sampling.top_p is not None and sampling.top_p < 1:
        index = _nucleus(scores, sampling.top_p)
        scores = scores[index]
    if sampling.min_p:
        keep = np.flatnonzero(np.exp(_shifted(scores)) >= sampling.min_p)
        index, scores = (keep if index is None else index[keep]), scores[keep]
    return index, scores


def _nucleus(scores: np.ndarray, top_p: float) -> np.ndarray:
    """The indices (ascending) of the tokens top-p keeps: the most likely tokens, in order, until the more likely
    ones hold `top_p` of the probability; only the likeliest few are sorted, more as the mass needs them."""
    weights = np.exp(_shifted(scores))
    total = weights.sum()
    n, count = len(weights), 64
    while True:
        if count < n:  # the `count` most likely, and every token as likely as the last of them
            candidates = np.flatnonzero(weights >= np.partition(weights, n - count)[n - count])
        else:
            candidates = np.arange(n)
        order = candidates[np.lexsort((candidates, -weights[candidates]))]
        mass = np.cumsum(weights[order]) / total
        if mass[-1] >= top_p or count >= n:
            break
        count *= 8
    kept = np.count_nonzero(mass[:-1] < top_p) + 1  # each token whose more likely ones hold less than top_p
    return np.sort(order[:kept])


_LARGEST = np.finfo(np.float64).max


def _shifted(scores: np.ndarray) -> np.ndarray:
    """`scores` less each row's best, so the best is 0; in a row with +inf scores, those are 0 and the rest -inf.
    Every row needs a score above -inf."""
    best = scores.max(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore"):
        shifted = scores - best
    infinite = np.isposinf(best)
    if not infinite.any():  # the common case: no whole-row select
        return shifted
    return np.where(infinite, np.where(np.isposinf(scores), 0.0, -np.inf), shifted)


def _divide(scores: np.ndarray, temperature: float) -> np.ndarray:
    """`scores / temperature`; when that overflows, the shifted scores divided, so the best stay apart from the
    rest instead of all becoming +inf."""
    with np.errstate(over="ignore"):
        divided = scores / temperature
    if divided.max() == np.inf and np.isposinf(divided[np.isfinite(scores)]).any():
        with np.errstate(over="ignore"):
            divided = _shifted(scores) / temperature
    return divided


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
    """`token` with its log-probability in `logprobs` [vocab] and the `top` most likely tokens (equal ones by
    lowest id, as `Runtime.forward_top` gives them)."""
    best = top_k_ids(logprobs, top) if top else np.zeros(0, dtype=np.int64)
    best = best[np.argsort(-logprobs[best], kind="stable")]
    return TokenChoice(token, float(logprobs[token]), tuple((int(t), float(logprobs[t])) for t in best))


class Sampler:
    """Picks one sequence's tokens: its `Sampling`, its own random generator, and the tokens it has seen (for
    the repetition penalty), so the sequence samples the same whatever batch it runs in.

    A sequence that picks greedily, or samples with top-k (k ≤ `MAX_TOP_K_FROM_TOP`) and no repetition penalty,
    needs only its row's largest logits (`needs_full` is False: `pick_top`); it picks exactly the token `pick`
    would from the whole row."""

    def __init__(self, sampling: Sampling, prompt: Sequence[int] = ()) -> None:
        self.sampling = sampling
        self.rng = np.random.default_rng(sampling.seed)
        self._seen: set[int] | None = set(prompt) if sampling.repetition_penalty != 1.0 else None
        self._plain_greedy = sampling.greedy and self._seen is None
        self._top_k_only = (not sampling.greedy and self._seen is None and bool(sampling.top_k)
                            and sampling.top_k <= MAX_TOP_K_FROM_TOP)

    def pick(self, logits: np.ndarray) -> TokenChoice:
        """The next token from this sequence's logits [vocab]; `GenerationError` when they leave none to pick."""
        if self._plain_greedy:
            token = int(np.argmax(logits))  # the first NaN, if there is one
            check_logits(float(logits[token]))
        else:
            check_logits(float(np.max(logits)))
            scores = np.asarray(logits, dtype=np.float64)
            if self._seen is not None:
                seen = np.fromiter((t for t in self._seen if 0 <= t < len(scores)), dtype=np.int64)
                scores = penalise(scores, seen, self.sampling.repetition_penalty)
            if self.sampling.greedy:
                token = int(np.argmax(scores))
            elif self.sampling.top_k:
                ids = top_k_ids(scores, self.sampling.top_k)
                token = int(ids[self._draw(scores[ids])])
            else:
                token = self._draw(scores)
            if self._seen is not None:
                self._seen.add(token)
        if self.sampling.logprobs is None:
            return TokenChoice(token)
        return scored_choice(log_softmax(logits), token, self.sampling.logprobs)

    def _draw(self, scores: np.ndarray) -> int:
        """The index of a token drawn from `scores` [n] (float64) by temperature, top-p and min-p: one uniform
        number of the sequence's generator against the cumulative probabilities, as `Generator.choice` draws."""
        index, scores = _candidates(scores, self.sampling)
        cumulative = np.cumsum(np.exp(_shifted(scores)))
        cumulative /= cumulative[-1]
        drawn = int(np.searchsorted(cumulative, self.rng.random(), side="right"))
        return drawn if index is None else int(index[drawn])

    @property
    def needs_full(self) -> bool:
        """Whether picking needs the whole row of logits (sampling without top-k, the repetition penalty), not
        only its largest ones."""
        return not (self._plain_greedy or self._top_k_only)

    @property
    def top(self) -> int:
        """How many of the largest logits `pick_top` reads."""
        return max(1, self.sampling.logprobs or 0, self.sampling.top_k if self._top_k_only else 0)

    def pick_top(self, ids: np.ndarray, values: np.ndarray, norm: float, nan: bool) -> TokenChoice:
        """As `pick` for a sequence that does not need the whole row: from its `top` largest logits (`ids`, largest
        first, ties by lowest id; their `values`), the log-normalizer log Σ exp(logits − max) and whether the row
        holds NaN (see `polylm.backend.Reduced`)."""
        check_logits(math.nan if nan else float(values[0]))
        if self._top_k_only:
            ascending = np.argsort(ids[:self.sampling.top_k])  # the order `pick` draws them in
            token = int(ids[ascending[self._draw(values[ascending].astype(np.float64))]])
        else:
            token = int(ids[0])
        if self.sampling.logprobs is None:
            return TokenChoice(token)
        logprobs = _shifted(values[None].astype(np.float64))[0] - norm
        count = min(self.sampling.logprobs, len(ids))
        position = int(np.flatnonzero(ids == token)[0])
        return TokenChoice(token, float(logprobs[position]),
                           tuple((int(t), float(p)) for t, p in zip(ids[:count], logprobs[:count])))
