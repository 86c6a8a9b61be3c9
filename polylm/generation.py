"""Backend-independent generation: sampling settings, token selection, batched decoding, text streaming."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from .backend import Runtime, Step
from .errors import InputError


@dataclass(frozen=True)
class Sampling:
    """How to pick tokens. temperature 0 is greedy; top_k None/0 and top_p None/1.0 switch those filters off."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        _check_int(self.max_new_tokens, "max_new_tokens", minimum=0)
        if not isinstance(self.temperature, (int, float)) or isinstance(self.temperature, bool) \
                or not math.isfinite(self.temperature) or self.temperature < 0:
            raise InputError(f"temperature must be a number ≥ 0, got {self.temperature!r}")
        if self.top_k is not None:
            _check_int(self.top_k, "top_k", minimum=0)
        if self.top_p is not None and (not isinstance(self.top_p, (int, float)) or isinstance(self.top_p, bool)
                                       or not 0 < self.top_p <= 1):
            raise InputError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None:
            _check_int(self.seed, "seed", minimum=0)


def _check_int(value: object, name: str, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise InputError(f"{name} must be an integer ≥ {minimum}, got {value!r}")


def pick_tokens(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> np.ndarray:
    """One token id per row of `logits` [batch, vocab]."""
    if sampling.temperature == 0:
        return logits.argmax(axis=-1)
    scores = logits.astype(np.float64) / sampling.temperature
    if sampling.top_k:
        k = min(sampling.top_k, scores.shape[-1])
        kth = np.partition(scores, -k, axis=-1)[:, -k][:, None]
        scores = np.where(scores < kth, -np.inf, scores)
    probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    if sampling.top_p is not None and sampling.top_p < 1:
        order = np.argsort(-probs, axis=-1, kind="stable")
        sorted_probs = np.take_along_axis(probs, order, axis=-1)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop_sorted = (np.cumsum(sorted_probs, axis=-1) - sorted_probs) >= sampling.top_p
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, axis=-1)
        probs = np.where(drop, 0.0, probs)
        probs /= probs.sum(axis=-1, keepdims=True)
    return np.array([rng.choice(probs.shape[-1], p=row) for row in probs])


def decode_batch(runtime: Runtime, prompts: Sequence[Sequence[int]], sampling: Sampling,
                 eos_ids: Sequence[int], capacity: int) -> Iterator[list[int | None]]:
    """Generate for a batch of prompts together (left-padded); yields, per step, each row's new token or None
    once that row has finished (eos, or `capacity` slots used)."""
    batch, longest = len(prompts), max(len(p) for p in prompts)
    steps = min(sampling.max_new_tokens, capacity - longest)
    if steps <= 0:
        return
    total = longest + steps
    ids = np.zeros((batch, longest), dtype=np.int64)
    mask = np.zeros((batch, total), dtype=bool)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt):] = prompt
        mask[row, longest - len(prompt):] = True
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    positions[:, longest:] = positions[:, longest - 1:longest] + np.arange(1, steps + 1)
    rng = np.random.default_rng(sampling.seed)
    cache = runtime.new_cache(batch, total)
    done = [False] * batch
    last = np.full(batch, longest - 1)
    logits = runtime.forward(Step(ids, positions[:, :longest], mask[:, :longest], gather=last), cache)
    eos = set(eos_ids)
    for step in range(steps):
        tokens = pick_tokens(logits, sampling, rng)
        out: list[int | None] = []
        for row in range(batch):
            token = int(tokens[row])
            if done[row] or token in eos:
                done[row] = True
                out.append(None)
            else:
                out.append(token)
        if all(done):
            return
        yield out
        if step + 1 == steps:
            return
        slot = longest + step
        step_view = Step(tokens[:, None].astype(np.int64), positions[:, :slot + 1], mask[:, :slot + 1],
                         gather=np.zeros(batch, dtype=np.int64))
        logits = runtime.forward(step_view, cache)


class TextStream:
    """Turns token ids into text pieces that never split a UTF-8 character and never show a stop string."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.emitted = 0
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add a token; return the text that is now final."""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        cut = self._stop_at(text)
        if cut is not None:
            self.stopped = True
            return self._emit(text[:cut])
        complete = text.rstrip("\ufffd")
        hold = max((_overlap(complete, s) for s in self.stop), default=0)
        return self._emit(complete[:len(complete) - hold])

    def finish(self) -> str:
        """The rest of the text once generation ended (an unfinished character is dropped)."""
        if self.stopped:
            return ""
        return self._emit(self.tokenizer.decode(self.ids).rstrip("\ufffd"))

    def _stop_at(self, text: str) -> int | None:
        hits = [i for i in (text.find(s, max(0, self.emitted - len(s))) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _emit(self, upto: str) -> str:
        piece = upto[self.emitted:]
        self.emitted = max(self.emitted, len(upto))
        return piece


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `stop`."""
    for size in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:size]):
            return size
    return 0
