"""Rank 0 drives the other ranks of a tensor-parallel job through the `Runtime` contract.

Only rank 0 runs `Model`, the tokenizer and sampling. Its runtime (`Driver`) broadcasts every `new_cache` and
`forward` call — the step's token ids are the tokens rank 0 picked — and the other ranks replay them
(`follow`), so all ranks run the same collectives in the same order and agree on every token by construction.
The transport is the backend's own engine (torch.distributed, mx.distributed) through `ShardRuntime.broadcast`.
"""

from __future__ import annotations

import atexit
import itertools
import weakref
from typing import Any, Callable

import numpy as np

from ..backend import Cache, Reduce, Reduced, Runtime, ShardRuntime, Step
from ..errors import ParallelError

_NEW_CACHE, _FORWARD, _STOP = "new_cache", "forward", "stop"


class Driver(Runtime):
    """Rank 0's runtime: each call is broadcast to the other ranks, then run on this rank's shard."""

    def __init__(self, local: ShardRuntime) -> None:
        self.local = local
        self.ir, self.dtype = local.plan.ir, local.dtype
        self._ids = itertools.count()
        self._freed: list[int] = []
        self._stopped = False
        #: turns an engine error into the error to raise (a launcher names the rank that died)
        self.explain: Callable[[BaseException], BaseException] = lambda error: error
        atexit.register(self.release)

    def new_cache(self, batch: int, capacity: int) -> Cache:
        key = next(self._ids)
        self._send((_NEW_CACHE, key, batch, capacity))
        cache = self.local.new_cache(batch, capacity)
        cache.parallel_key = key  # type: ignore[attr-defined]
        weakref.finalize(cache, self._freed.append, key)  # the other ranks drop theirs with the next message
        return cache

    def forward(self, step: Step, cache: Cache | None = None) -> np.ndarray:
        return self._run(step, cache, lambda: self.local.forward(step, cache))

    def forward_top(self, step: Step, cache: Cache | None, reduce: Reduce) -> Reduced:
        """As `forward` on every rank (the others compute the same pass); rank 0 reduces its gathered outputs."""
        return self._run(step, cache, lambda: self.local.forward_top(step, cache, reduce))

    def _run(self, step: Step, cache: Cache | None, local: Callable[[], Any]) -> Any:
        self._send((_FORWARD, step, getattr(cache, "parallel_key", None)))
        try:
            return local()
        except RuntimeError as exc:  # the engine's own error when a rank is gone
            raise self.explain(ParallelError(f"tensor-parallel forward pass failed on rank 0 of "
                                             f"{self.local.plan.shard.world_size}: {exc}")) from None

    def release(self) -> None:
        """Let the other ranks' `follow` return (once; also run at exit)."""
        if not self._stopped:
            self._stopped = True
            try:
                self.local.broadcast((_STOP, [], ()))
            except Exception:  # noqa: BLE001 - the group may already be gone at exit
                pass

    def _send(self, message: tuple) -> None:
        if self._stopped:
            raise ParallelError("this tensor-parallel model was released; its other ranks have stopped")
        freed, self._freed = self._freed, []
        try:
            self.local.broadcast((message[0], freed, message[1:]))
        except RuntimeError as exc:
            raise self.explain(ParallelError(f"tensor-parallel rank 0 cannot reach the other ranks: {exc}")) from None


class Follower(Runtime):
    """The runtime a rank other than 0 holds: `follow` replays rank 0's calls; direct calls are refused."""

    def __init__(self, local: ShardRuntime) -> None:
        self.local = local
        self.ir, self.dtype = local.plan.ir, local.dtype

    def new_cache(self, batch: int, capacity: int) -> Cache:
        raise self._refuse()

    def forward(self, step: Step, cache: Cache | None = None) -> np.ndarray:
        raise self._refuse()

    def _refuse(self) -> ParallelError:
        shard = self.local.plan.shard
        return ParallelError(f"rank {shard.rank} of {shard.world_size} only follows rank 0; call "
                             "polylm.parallel.follow(model) here and use the model on rank 0")

    def follow(self) -> None:
        caches: dict[int, Cache] = {}
        shard = self.local.plan.shard
        while True:
            try:
                kind, freed, args = self.local.broadcast(None)
            except RuntimeError as exc:
                raise ParallelError(f"tensor-parallel rank {shard.rank}: lost rank 0 ({exc})") from None
            for key in freed:
                caches.pop(key, None)
            if kind == _STOP:
                return
            if kind == _NEW_CACHE:
                key, batch, capacity = args
                caches[key] = self.local.new_cache(batch, capacity)
                continue
            step, key = args
            try:
                self.local.forward(step, caches[key] if key is not None else None)
            except RuntimeError as exc:
                raise ParallelError(f"tensor-parallel forward pass failed on rank {shard.rank}: {exc}") from None


def follow(model) -> None:
    """On a rank other than 0: run rank 0's forward passes until rank 0 calls `release` (or exits)."""
    runtime = model.runtime
    if not isinstance(runtime, Follower):
        raise ParallelError("polylm.parallel.follow needs a model loaded with tensor_parallel on a rank other than 0")
    runtime.follow()


def release(model) -> None:
    """On rank 0: end the other ranks' `follow`. Also done when rank 0's process exits."""
    if isinstance(model.runtime, Driver):
        model.runtime.release()


def wrap(local: ShardRuntime) -> Runtime:
    """Rank 0's `Driver` or another rank's `Follower` around a backend's shard runtime."""
    return Driver(local) if local.plan.shard.rank == 0 else Follower(local)
