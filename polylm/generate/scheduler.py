"""Continuous batching: many requests through one key/value cache, on the unchanged `Runtime` contract.

A cache has a fixed number of rows and slots, and every forward pass writes the same new slots in all rows.
Each step, every running row feeds its one next token; a waiting request takes a free row by bringing its
prompt, so a step where L prompt tokens join has L new slots: the joining row's prompt fills them, the other
rows get L − 1 masked slots and then their real token in the last one, and every row's logits come from the
last slot. Positions are each request's own, so it computes exactly what it would alone.

A finished row keeps its tokens and their keys/values. A new request whose prompt starts with k ≥ `min_prefix`
of those tokens takes that row, masks out the row's slots after the prefix and feeds only the rest of its
prompt (a chat's earlier turns, a shared system prompt); otherwise it masks out all of them.

Every step uses one slot in every row, so a request needs as many slots as it has tokens left to feed. A request
is only admitted when every running one can still finish (or use up its reservation: at most half a fixed-size
cache) in the slots left; when the next one cannot, admission stops, the running requests drain, and a fresh
cache starts. A request that outgrows its reservation when the cache is full moves on to the fresh cache by
recomputing its tokens so far, with its own sampler, so it still makes what it would alone.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from ..backend import Cache, Reduce, Reduced, Runtime, Step
from ..errors import InputError, PolylmError
from .sampling import Sampler, Sampling, TokenChoice

STOP, LENGTH, CANCELLED, ERROR = "stop", "length", "cancelled", "error"
#: Steps over which demand (running and waiting requests) is remembered when sizing a fresh cache's batch.
DEMAND_WINDOW = 64


@dataclass(eq=False)
class Request:
    """One prompt being continued. `limit` is how many tokens it may make: `max_new_tokens`, cut to the context."""

    id: int
    prompt: list[int]
    sampling: Sampling
    limit: int
    sampler: Sampler
    tokens: list[int] = field(default_factory=list)
    #: None while running; "stop" (eos, or a stop string via `cancel`), "length", "cancelled", or "error" (its
    #: logits left no token to pick, or `abort` ended it)
    finish_reason: str | None = None
    #: prompt tokens whose keys/values came from the cache instead of being computed
    reused_tokens: int = 0
    row: int | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def _sequence(self) -> list[int]:
        """What a row must hold to continue: the prompt and every token made (the last one not yet fed)."""
        return self.prompt + self.tokens

    def _left(self) -> int:
        """Single-slot feeds still needed after the next token."""
        return self.limit - len(self.tokens) - 1


@dataclass(frozen=True)
class Output:
    """What one step made for one request: a token (None when the step ended it without one, e.g. at eos),
    the finish reason if the request ended, and with "error" the error that ended it (the other requests of the
    step go on)."""

    request: Request
    choice: TokenChoice | None
    finish_reason: str | None = None
    error: PolylmError | None = None
    #: the end-of-sequence token whose pick ended the request (not one of its tokens), with its logprobs
    eos: TokenChoice | None = None


@dataclass
class Stats:
    """Running totals, for benchmarks and tests."""

    steps: int = 0
    slots: int = 0  # cache slots computed, rows × new slots summed over steps (padding included)
    prompt_tokens: int = 0  # prompt tokens computed
    reused_tokens: int = 0  # prompt tokens taken from a kept prefix instead
    generated_tokens: int = 0
    caches: int = 0  # fresh caches started
    moved: int = 0  # requests moved to a fresh cache when the full one could not hold them
    recomputed_tokens: int = 0  # tokens computed again when they moved


@dataclass
class _Row:
    request: Request | None = None
    history: list[int] = field(default_factory=list)  # tokens whose keys/values the row holds, in order
    slots: list[int] = field(default_factory=list)  # the cache slot of each of them
    pending: int | None = None  # the last token picked, fed at the next step
    last_used: int = -1


class Scheduler:
    """Runs requests in one cache of up to `max_batch` rows; `submit`, then call `step` while `busy`.

    A fresh cache has `max_batch` rows, or with `min_batch` set, the power of two (within the bounds) that fits
    the recent demand: then when requests wait and every row is busy, the running ones move on to a larger cache
    (recomputing their tokens), and an idle cache with more rows than needed gives way to a smaller one (unless
    it has at most twice the rows needed and holds a prefix of the next request).
    `capacity` is the slots of a fresh cache (more when one request alone needs more), of which a request reserves
    at most half; None sizes each fresh cache to the requests it starts with, which reserve all they may need.
    `context_length` (default: the model's) bounds each request's length.
    `min_prefix` is the shortest prompt prefix reused from a finished row; None turns reuse off. Not
    thread-safe: one thread owns a scheduler.
    """

    def __init__(self, runtime: Runtime, *, max_batch: int = 8, min_batch: int | None = None,
                 capacity: int | None = None, context_length: int | None = None, eos_ids: Sequence[int] = (),
                 min_prefix: int | None = None) -> None:
        if max_batch < 1:
            raise InputError(f"max_batch must be ≥ 1, got {max_batch}")
        if min_batch is not None and not 1 <= min_batch <= max_batch:
            raise InputError(f"min_batch must be between 1 and max_batch ({max_batch}), got {min_batch}")
        if min_prefix is not None and min_prefix < 1:
            raise InputError(f"min_prefix must be ≥ 1 (or None for no reuse), got {min_prefix}")
        self.runtime = runtime
        self.max_batch = max_batch
        self.min_batch = max_batch if min_batch is None else min_batch
        self.capacity = capacity
        self.reserve = None if capacity is None else max(capacity // 2, 1)
        self.context_length = runtime.ir.context_length if context_length is None else context_length
        self.eos = frozenset(int(t) for t in eos_ids)
        self.min_prefix = min_prefix
        self.waiting: deque[Request] = deque()
        self.stats = Stats()
        self._ids = itertools.count()
        self._ended: list[Output] = []  # requests that ended without running (nothing to generate)
        self._rows: list[_Row] = []
        self._cache: Cache | None = None
        self._mask = np.zeros((0, 0), dtype=bool)
        self._positions = np.zeros((0, 0), dtype=np.int64)
        self._demand: deque[int] = deque(maxlen=DEMAND_WINDOW)

    # -- the caller's side -----------------------------------------------------------------------------------

    def submit(self, prompt: Sequence[int], sampling: Sampling) -> Request:
        """Queue a prompt (token ids); it joins a row at a coming step."""
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise InputError("prompt is empty")
        if len(prompt) > self.context_length:
            raise InputError(f"prompt of {len(prompt)} tokens exceeds the model's context of "
                             f"{self.context_length} tokens")
        limit = min(sampling.max_new_tokens, self.context_length - len(prompt))
        request = Request(next(self._ids), prompt, sampling, limit, Sampler(sampling, prompt))
        if limit == 0:
            request.finish_reason = LENGTH
            self._ended.append(Output(request, None, LENGTH))
        else:
            self.waiting.append(request)
        return request

    def cancel(self, request: Request, reason: str = CANCELLED) -> None:
        """End a request now (a stop string was met, the client left); its row is free for the next step."""
        if request.finished:
            return
        if request.row is not None:
            self._free(request, reason)
            return
        request.finish_reason = reason
        try:
            self.waiting.remove(request)
        except ValueError:
            pass

    def abort(self) -> list[Request]:
        """End every running request (finish reason "error") and let the cache go, after a `step` raised: its
        rows and cache can no longer be trusted. Waiting requests stay queued for a fresh cache; the ended ones
        are returned."""
        ended = [row.request for row in self._rows if row.request is not None]
        for request in ended:
            request.row, request.finish_reason = None, ERROR
        self._rows, self._cache = [], None
        self._mask = np.zeros((0, 0), dtype=bool)
        self._positions = np.zeros((0, 0), dtype=np.int64)
        return ended

    @property
    def busy(self) -> bool:
        """Whether a `step` has anything to do."""
        return bool(self.waiting or self._ended or self.running)

    @property
    def running(self) -> int:
        return sum(row.request is not None for row in self._rows)

    @property
    def rows(self) -> int:
        """Rows of the current cache (0 before the first)."""
        return len(self._rows)

    def step(self) -> list[Output]:
        """Admit what fits, run one forward pass, and pick one token for every running request. A request whose
        logits leave no token to pick ends alone (`Output.error`); an exception from the forward pass leaves the
        scheduler to `abort`."""
        outputs: list[Output] = []
        if self.running and self._cache.length == self._cache.capacity:
            self._move_running()
        self._demand.append(self.running + len(self.waiting))
        feeds = self._admit()
        joined = set(feeds)
        for index, row in enumerate(self._rows):
            if row.request is not None and index not in feeds:
                feeds[index] = ([row.pending], len(row.history))
        if not feeds:
            return self._take_ended()
        reduce = self._reduce()
        reduced = self._forward(feeds, joined, reduce)
        full = {index: n for n, index in enumerate(np.flatnonzero(reduce.full))}
        for index in feeds:
            request = self._rows[index].request
            sampler = request.sampler
            try:
                if index in full:
                    choice = sampler.pick(reduced.rows[full[index]])
                else:
                    choice = sampler.pick_top(reduced.ids[index], reduced.values[index], reduced.norm[index],
                                              bool(reduced.nan[index]))
            except PolylmError as exc:
                self._free(request, ERROR)
                outputs.append(Output(request, None, ERROR, exc))
                continue
            if choice.token in self.eos:
                self._free(request, STOP)
                outputs.append(Output(request, None, STOP, eos=choice))
                continue
            request.tokens.append(choice.token)
            self.stats.generated_tokens += 1
            if len(request.tokens) >= request.limit:
                self._free(request, LENGTH)
                outputs.append(Output(request, choice, LENGTH))
            else:
                self._rows[index].pending = choice.token
                outputs.append(Output(request, choice))
        return self._take_ended() + outputs

    def _take_ended(self) -> list[Output]:
        ended, self._ended = self._ended, []
        return ended

    # -- admission -------------------------------------------------------------------------------------------

    def _admit(self) -> dict[int, tuple[list[int], int]]:
        """Seat the waiting requests that fit; for each new row, the tokens it feeds and the first one's position."""
        if not self.waiting:
            return {}
        if self._rows and self.running == len(self._rows) < self.max_batch:  # more rows needed: a larger cache
            self._move_running()
        if self.running == 0 and self._wants_fresh_cache():
            self._fresh_cache()
        joins = self._seat_waiting()
        if not joins and self.running == 0:  # the queue's head does not fit in the slots left
            self._fresh_cache()
            joins = self._seat_waiting()
        return joins

    def _wants_fresh_cache(self) -> bool:
        """Nothing runs: whether a cache with another number of rows suits the queue better than this one."""
        if self._cache is None:
            return True
        rows = self._rows_for(max(len(self.waiting), max(self._demand, default=0)))
        if rows == len(self._rows):
            return False
        # more rows are needed; or fewer are, and idle rows would cost every step more than a kept prefix saves
        return rows > len(self._rows) or len(self._rows) > 2 * rows or not self._holds_prefix_of(self.waiting[0])

    def _holds_prefix_of(self, request: Request) -> bool:
        sequence = request._sequence()
        return self.min_prefix is not None and any(self._reusable(row, sequence) >= self.min_prefix
                                                   for row in self._rows)

    def _reusable(self, row: _Row, prompt: list[int]) -> int:
        """How many leading tokens of `prompt` the row holds and can lend: all it shares, unless the cache's
        sliding-window rings may have overwritten some of their keys with those of the row's later tokens
        (`Cache.tail_allowance`), then none."""
        shared = _common_prefix(row.history, prompt, len(prompt) - 1)
        allowance = self._cache.tail_allowance if self._cache is not None else None
        return shared if allowance is None or len(row.history) - shared <= allowance else 0

    def _rows_for(self, demand: int) -> int:
        rows = 1
        while rows < demand:
            rows *= 2
        return max(self.min_batch, min(self.max_batch, rows))

    def _seat_waiting(self) -> dict[int, tuple[list[int], int]]:
        if self._cache is None:
            return {}
        past, capacity = self._cache.length, self._cache.capacity
        running = [row.request for row in self._rows if row.request is not None]
        new = 1 if running else 0
        # single-slot feeds the running requests still need (or have reserved) after this step
        after = max((self._reserved(r) for r in running), default=0)
        joins: dict[int, tuple[list[int], int]] = {}
        while self.waiting:
            request = self.waiting[0]
            free = [i for i, row in enumerate(self._rows) if row.request is None and i not in joins]
            if not free:
                break
            sequence = request._sequence()
            index, kept = self._choose_row(sequence, free)
            feed, reserved = len(sequence) - kept, self._reserved(request)
            if past + max(new, feed) + max(after, reserved) > capacity:
                break
            new, after = max(new, feed), max(after, reserved)
            self.waiting.popleft()
            self._seat(index, request, kept)
            joins[index] = (sequence[kept:], kept)
        return joins

    def _reserved(self, request: Request) -> int:
        left = request._left()
        return left if self.reserve is None else min(left, self.reserve)

    def _move_running(self) -> None:
        """Put the running requests back at the head of the queue, to continue in a fresh cache (this one is full,
        or has too few rows)."""
        running = sorted((row.request for row in self._rows if row.request is not None), key=lambda r: r.id)
        for request in running:
            row = self._rows[request.row]
            row.request, row.pending, request.row = None, None, None
        self.waiting.extendleft(reversed(running))
        self.stats.moved += len(running)

    def _choose_row(self, prompt: list[int], free: list[int]) -> tuple[int, int]:
        """The free row to take and how many prompt tokens it already holds: the longest reusable prefix, else
        an empty row, else the one idle longest."""
        best, kept = None, 0
        if self.min_prefix is not None:
            for index in free:
                shared = self._reusable(self._rows[index], prompt)
                if shared >= self.min_prefix and shared > kept:
                    best, kept = index, shared
        if best is None:
            best = min(free, key=lambda i: (len(self._rows[i].history) > 0, self._rows[i].last_used))
        return best, kept

    def _seat(self, index: int, request: Request, kept: int) -> None:
        row = self._rows[index]
        self._mask[index, row.slots[kept:]] = False
        del row.history[kept:], row.slots[kept:]
        row.request, row.pending = request, None
        request.row = index
        request.reused_tokens += kept
        self.stats.reused_tokens += kept

    def _free(self, request: Request, reason: str) -> None:
        row = self._rows[request.row]
        row.request, row.pending = None, None
        request.row, request.finish_reason = None, reason

    def _fresh_cache(self) -> None:
        batch = self._rows_for(max(len(self.waiting), max(self._demand, default=0)))
        group = list(itertools.islice(self.waiting, batch))
        need = max(len(r._sequence()) for r in group) + max(self._reserved(r) for r in group)
        if self.capacity is not None:
            head = group[0]
            need = max(self.capacity, len(head._sequence()) + self._reserved(head))
        self._cache = None  # let the old cache go before the new one is allocated
        self._cache = self.runtime.new_cache(batch, need)
        self._rows = [_Row() for _ in range(batch)]
        self._mask = np.zeros((batch, need), dtype=bool)
        self._positions = np.zeros((batch, need), dtype=np.int64)
        self.stats.caches += 1

    # -- the forward pass ------------------------------------------------------------------------------------

    def _reduce(self) -> Reduce:
        """What the running rows' samplers read of their logits: the top ones (and the log-normalizer for
        logprobs), whole rows only for those that sample or penalise (`Runtime.forward_top`)."""
        samplers = [row.request.sampler for row in self._rows if row.request is not None]
        full = np.array([row.request is not None and row.request.sampler.needs_full for row in self._rows], bool)
        return Reduce(max((s.top for s in samplers), default=1), full,
                      norm=any(s.sampling.logprobs is not None for s in samplers))

    def _forward(self, feeds: dict[int, tuple[list[int], int]], joined: set[int], reduce: Reduce) -> Reduced:
        """One pass over `feeds` (row → tokens, first position), right-aligned in the step's new slots; rows in
        `joined` bring a prompt (or, when moved from a full cache, their tokens so far). Returns what `reduce`
        asks of the rows' logits."""
        past = self._cache.length
        new = max(len(tokens) for tokens, _ in feeds.values())
        end = past + new
        batch = len(self._rows)
        ids = np.zeros((batch, new), dtype=np.int64)
        self._mask[:, past:end] = False
        self._positions[:, past:end] = 0
        for index, (tokens, start) in feeds.items():
            count, first = len(tokens), end - len(tokens)
            ids[index, new - count:] = tokens
            self._mask[index, first:end] = True
            # masked slots take the first new position, so no row's positions (dynamic RoPE reads their max) grow
            self._positions[index, past:first] = start
            self._positions[index, first:end] = np.arange(start, start + count)
            row = self._rows[index]
            row.history.extend(tokens)
            row.slots.extend(range(first, end))
            row.last_used = self.stats.steps
            if index in joined and row.request.tokens:  # moved from a full cache
                self.stats.recomputed_tokens += count
            elif index in joined:
                self.stats.prompt_tokens += count
        self.stats.steps += 1
        self.stats.slots += batch * new
        step = Step(ids, self._positions[:, :end].copy(), self._mask[:, :end].copy(),
                    gather=np.full(batch, new - 1, dtype=np.int64))
        return self.runtime.forward_top(step, self._cache, reduce)


def _common_prefix(history: list[int], prompt: list[int], limit: int) -> int:
    """How many leading tokens `history` and `prompt` share, at most `limit`."""
    count = min(len(history), len(prompt), limit)
    if count <= 0:
        return 0
    differ = np.flatnonzero(np.asarray(history[:count]) != np.asarray(prompt[:count]))
    return int(differ[0]) if differ.size else count


def decode_batch(runtime: Runtime, prompts: Sequence[Sequence[int]], sampling: Sampling,
                 eos_ids: Sequence[int], capacity: int) -> Iterator[list[int | None]]:
    """Generate for a batch of prompts together (left-padded, each row seeded with `sampling.seed`); yields, per
    step, each row's new token or None once that row has finished (eos, or `capacity` positions used).

    `capacity` is the longest sequence (prompt and new tokens) a row may grow to.
    """
    scheduler = Scheduler(runtime, max_batch=len(prompts), context_length=capacity, eos_ids=eos_ids)
    requests = [scheduler.submit(prompt, sampling) for prompt in prompts]
    while scheduler.busy:
        outputs = scheduler.step()
        for out in outputs:
            if out.error is not None:
                raise out.error
        made = {out.request.id: out.choice.token for out in outputs if out.choice is not None}
        if made:
            yield [made.get(request.id) for request in requests]
