"""The worker thread that owns the model and its continuous-batching `Scheduler`.

It takes prompts and cancellations from a thread-safe inbox, runs steps while there is work, turns tokens into
text (stop strings included) and posts each request's events onto that request's queue, so the HTTP side never
waits on the model.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import asdict, dataclass
from typing import Any, Callable

from ..errors import InputError, PolylmError
from ..generate.sampling import Sampling
from ..generate.scheduler import STOP, Output, Scheduler
from ..generate.stream import TextStream
from ..model import Model
from .schema import ApiError

log = logging.getLogger("polylm.server")

#: Default prompt-prefix length worth reusing from the cache (shorter prefixes are recomputed).
MIN_PREFIX = 16
#: Slots of the server's cache when the model's context is longer (a single longer request gets its own).
MAX_CACHE_SLOTS = 4096


@dataclass(eq=False)
class Job:
    """One prompt of one HTTP request, as the worker runs it. `post` puts an event on the request's queue from
    any thread: ("token", index, text piece, TokenChoice | None, finish reason | None, tokens made) or
    ("error", index, ApiError)."""

    index: int
    prompt: list[int]
    sampling: Sampling
    text: TextStream
    post: Callable[[tuple], None]
    request: Any = None  # the scheduler's Request once submitted (worker thread only)


class Engine:
    """The worker thread that owns the scheduler. `submit` and `cancel` may be called from any thread."""

    def __init__(self, model: Model, *, max_batch: int = 8, max_queue: int = 64, capacity: int | None = None,
                 min_prefix: int | None = MIN_PREFIX) -> None:
        if max_queue < 0:
            raise InputError(f"max_queue must be ≥ 0, got {max_queue}")
        self.model, self.max_batch, self.max_queue = model, max_batch, max_queue
        self.capacity = capacity or min(model.ir.context_length, MAX_CACHE_SLOTS)
        self.min_prefix = min_prefix
        self.scheduler = self._new_scheduler()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._queued = 0  # jobs accepted but not yet running
        self._jobs: dict[int, Job] = {}  # by scheduler request id
        self._waiting: list[Job] = []
        self._thread = threading.Thread(target=self._run, name="polylm-engine", daemon=True)
        self.snapshot: dict[str, int] = {"running": 0, "waiting": 0}

    def _new_scheduler(self) -> Scheduler:
        eos = self.model.tokenizer.eos_ids if self.model.tokenizer else ()
        return Scheduler(self.model.runtime, max_batch=self.max_batch, min_batch=1, capacity=self.capacity,
                         eos_ids=eos, min_prefix=self.min_prefix)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._inbox.put(("stop", []))
        self._thread.join(timeout=30)

    def submit(self, jobs: list[Job]) -> None:
        """Queue jobs, or raise a 429 ApiError when that would put more than `max_queue` jobs in the queue."""
        with self._lock:
            if self._queued + len(jobs) > self.max_queue:
                raise ApiError(429, f"the server is busy: {self._queued} requests are waiting (limit "
                                    f"{self.max_queue}); retry later", type="server_busy", code="queue_full")
            self._queued += len(jobs)
        self._inbox.put(("submit", jobs))

    def cancel(self, jobs: list[Job]) -> None:
        """End jobs now (their client left); finished ones are ignored."""
        self._inbox.put(("cancel", jobs))

    def _unqueue(self, count: int) -> None:
        with self._lock:
            self._queued -= count

    def _run(self) -> None:
        while True:
            block = not self.scheduler.busy
            while True:
                try:
                    kind, jobs = self._inbox.get(block=block)
                except queue.Empty:
                    break
                block = False
                if kind == "stop":
                    self._fail_all(ApiError(503, "the server is shutting down", type="server_error"))
                    return
                (self._on_submit if kind == "submit" else self._on_cancel)(jobs)
            if self.scheduler.busy:
                self._step()

    def _on_submit(self, jobs: list[Job]) -> None:
        for job in jobs:
            try:
                job.request = self.scheduler.submit(job.prompt, job.sampling)
            except PolylmError as exc:
                self._unqueue(1)
                job.post(("error", job.index, ApiError(400, str(exc))))
                continue
            self._jobs[job.request.id] = job
            self._waiting.append(job)

    def _on_cancel(self, jobs: list[Job]) -> None:
        for job in jobs:
            if job.request is not None and not job.request.finished:
                self.scheduler.cancel(job.request)
                self._jobs.pop(job.request.id, None)
        self._update_waiting()

    def _step(self) -> None:
        try:
            outputs = self.scheduler.step()
        except Exception as exc:  # noqa: BLE001 - a failing step must fail its requests, not the server
            log.exception("generation step failed")
            self._fail_all(ApiError(500, f"generation failed: {exc}", type="server_error"))
            self.scheduler = self._new_scheduler()
            return
        for out in outputs:
            self._deliver(out)
        self._update_waiting()

    def _deliver(self, out: Output) -> None:
        job = self._jobs.get(out.request.id)
        if job is None:
            return
        piece, finish = "", out.finish_reason
        if out.choice is not None:
            piece = job.text.push(out.choice.token)
            if job.text.stopped and finish is None:
                self.scheduler.cancel(out.request, STOP)
                finish = STOP
        if finish is not None:
            piece += job.text.finish()
            del self._jobs[out.request.id]
        job.post(("token", job.index, piece, out.choice, finish, len(out.request.tokens)))

    def _update_waiting(self) -> None:
        still = [job for job in self._waiting if job.request.row is None and not job.request.finished]
        self._unqueue(len(self._waiting) - len(still))
        self._waiting = still
        self.snapshot = {"running": self.scheduler.running, "waiting": len(self.scheduler.waiting),
                         **asdict(self.scheduler.stats)}

    def _fail_all(self, error: ApiError) -> None:
        for job in list(self._jobs.values()):
            job.post(("error", job.index, error))
        self._unqueue(len(self._waiting))
        self._jobs.clear()
        self._waiting = []
