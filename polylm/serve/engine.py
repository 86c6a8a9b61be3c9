"""The worker thread that owns the model and its continuous-batching `Scheduler`.

It takes prompts and cancellations from a thread-safe inbox, runs steps while there is work, turns tokens into
text (stop strings included) and posts each request's events onto that request's queue, so the HTTP side never
waits on the model. A prompt to echo with logprobs is scored here, in passes of its own (bounded in size, see
`polylm.generate.scoring`), before it joins the scheduler. A request whose logits leave no token to pick, or
whose prompt cannot be scored, fails alone; any other exception fails the requests running at the time and the
engine goes on; should its thread ever end, every request still in it fails, and new ones are refused with 503
at once (`failure` says why).
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import asdict, dataclass
from typing import Callable

from ..errors import InputError, PolylmError
from ..generate.sampling import Sampling
from ..generate.scheduler import STOP, Output, Request, Scheduler
from ..generate.scoring import prompt_logprobs
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
    any thread: ("prompt", index, echoed text, [(TokenChoice, text offset)] per prompt token when logprobs are
    asked for), first and only with `echo`; ("token", index, text piece, TokenChoice | None, finish reason | None,
    tokens made); or ("error", index, ApiError). With `echo`, an end-of-sequence token that ends the request
    comes as a last "token" event with an empty piece (its logprob listed, as OpenAI and vLLM list it)."""

    index: int
    prompt: list[int]
    sampling: Sampling
    text: TextStream
    post: Callable[[tuple], None]
    echo: tuple[str, list[int]] | None = None  # the prompt's text and its tokens' offsets in it, to answer first
    request: Request | None = None  # the scheduler's Request once submitted (worker thread only)
    done: bool = False  # its last event was posted (worker thread only)


def api_error(exc: BaseException) -> ApiError:
    """How a failure of one request is answered: 400 for bad input, 500 otherwise."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, InputError):
        return ApiError(400, str(exc))
    kind = "generation failed" if isinstance(exc, PolylmError) else f"generation failed ({type(exc).__name__})"
    return ApiError(500, f"{kind}: {exc}", type="server_error", code="generation_failed")


class Engine:
    """The worker thread that owns the scheduler. `submit` and `cancel` may be called from any thread.

    At most `max_batch` + `max_queue` jobs are in it at once (running, or waiting for a row); more get 429.
    """

    def __init__(self, model: Model, *, max_batch: int = 8, max_queue: int = 64, capacity: int | None = None,
                 min_prefix: int | None = MIN_PREFIX) -> None:
        if max_queue < 0:
            raise InputError(f"max_queue must be ≥ 0, got {max_queue}")
        self.model, self.max_batch, self.max_queue = model, max_batch, max_queue
        self.capacity = capacity or min(model.ir.context_length, MAX_CACHE_SLOTS)
        eos = model.tokenizer.eos_ids if model.tokenizer else ()
        self.scheduler = Scheduler(model.runtime, max_batch=max_batch, min_batch=1, capacity=self.capacity,
                                   eos_ids=eos, min_prefix=min_prefix)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._active = 0  # jobs accepted and not yet done
        self._jobs: dict[int, Job] = {}  # by scheduler request id
        self._thread = threading.Thread(target=self._run, name="polylm-engine", daemon=True)
        self.snapshot: dict[str, int] = {"running": 0, "waiting": 0}
        #: why the engine takes no more requests (it stopped or died); None while it runs
        self.failure: str | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._inbox.put(("stop", []))
        self._thread.join(timeout=30)

    @property
    def limit(self) -> int:
        """The most jobs the engine holds at once."""
        return self.max_batch + self.max_queue

    def submit(self, jobs: list[Job]) -> None:
        """Queue jobs; ApiError 400 when they could never fit, 429 when they do not fit now, 503 when the engine
        has stopped."""
        if len(jobs) > self.limit:
            raise ApiError(400, f"this request has {len(jobs)} prompts, but the server holds at most {self.limit} "
                                f"at once (--max-batch {self.max_batch} + --max-queue {self.max_queue})",
                           param="prompt")
        with self._lock:
            if self.failure is not None:
                raise ApiError(503, f"the server cannot generate: {self.failure}", type="server_error",
                               code="engine_stopped")
            if self._active + len(jobs) > self.limit:
                raise ApiError(429, f"the server is busy: {self._active} requests are running or waiting (limit "
                                    f"{self.limit}); retry later", type="server_busy", code="queue_full")
            self._active += len(jobs)
            self._inbox.put(("submit", jobs))

    def cancel(self, jobs: list[Job]) -> None:
        """End jobs now (their client left); finished ones are ignored."""
        self._inbox.put(("cancel", jobs))

    # -- the worker thread -----------------------------------------------------------------------------------

    def _run(self) -> None:
        reason = "the engine stopped unexpectedly"
        try:
            while True:
                try:
                    if not self._turn():
                        reason = "the server is shutting down"
                        return
                except Exception as exc:  # noqa: BLE001 - fail the running requests, not the server
                    log.exception("generation failed")
                    self._recover(exc)
        except BaseException as exc:
            log.exception("the engine stopped")
            reason = f"the engine stopped ({type(exc).__name__}: {exc})"
            raise
        finally:
            self._close(reason)

    def _turn(self) -> bool:
        """Take what the inbox holds (waiting for it when idle), then run a step; False once told to stop."""
        block = not self.scheduler.busy
        while True:
            try:
                kind, jobs = self._inbox.get(block=block)
            except queue.Empty:
                break
            block = False
            if kind == "stop":
                return False
            (self._on_submit if kind == "submit" else self._on_cancel)(jobs)
        if self.scheduler.busy:
            for out in self.scheduler.step():
                self._deliver(out)
        self._update_snapshot()
        return True

    def _on_submit(self, jobs: list[Job]) -> None:
        for job in jobs:
            try:
                if job.echo is not None:
                    self._echo(job)
                job.request = self.scheduler.submit(job.prompt, job.sampling)
            except Exception as exc:  # noqa: BLE001 - scoring a prompt may fail in any way; the request fails alone
                if not isinstance(exc, PolylmError):
                    log.exception("scoring a prompt failed")
                self._fail(job, api_error(exc))
                continue
            self._jobs[job.request.id] = job

    def _echo(self, job: Job) -> None:
        """Post the prompt's text, with its tokens' logprobs when the request asks for them."""
        text, offsets = job.echo
        top = job.sampling.logprobs
        scored = [] if top is None else prompt_logprobs(self.model.runtime, job.prompt, top)
        job.post(("prompt", job.index, text, list(zip(scored, offsets))))

    def _on_cancel(self, jobs: list[Job]) -> None:
        for job in jobs:
            if job.done:
                continue
            if job.request is not None:
                self.scheduler.cancel(job.request)
                self._jobs.pop(job.request.id, None)
            self._release(job)

    def _deliver(self, out: Output) -> None:
        job = self._jobs.get(out.request.id)
        if job is None:
            return
        if out.error is not None:
            del self._jobs[out.request.id]
            self._fail(job, api_error(out.error))
            return
        piece, finish, choice = "", out.finish_reason, out.choice
        if choice is None and job.echo is not None:
            choice = out.eos
        if out.choice is not None:
            piece = job.text.push(out.choice.token)
            if job.text.stopped and finish is None:
                self.scheduler.cancel(out.request, STOP)
                finish = STOP
        if finish is not None:
            piece += job.text.finish()
            del self._jobs[out.request.id]
            self._release(job)
        job.post(("token", job.index, piece, choice, finish, len(out.request.tokens)))

    def _recover(self, exc: Exception) -> None:
        """After an exception in a turn: the scheduler's running requests end, and so does every job whose
        request finished without its last event being posted; waiting ones stay."""
        self.scheduler.abort()
        error = api_error(exc)
        for request_id, job in list(self._jobs.items()):
            if job.request.finished:
                del self._jobs[request_id]
                self._fail(job, error)

    def _update_snapshot(self) -> None:
        self.snapshot = {"running": self.scheduler.running, "waiting": len(self.scheduler.waiting),
                         **asdict(self.scheduler.stats)}

    def _close(self, reason: str) -> None:
        """The thread is ending: refuse new jobs, and fail every job still in the engine or its inbox."""
        with self._lock:
            self.failure = reason
        error = ApiError(503, reason, type="server_error", code="engine_stopped")
        for job in self._jobs.values():
            self._fail(job, error)
        self._jobs.clear()
        while True:
            try:
                kind, jobs = self._inbox.get(block=False)
            except queue.Empty:
                break
            if kind == "submit":
                for job in jobs:
                    self._fail(job, error)
        self.snapshot = {**self.snapshot, "running": 0, "waiting": 0}

    def _fail(self, job: Job, error: ApiError) -> None:
        if not job.done:
            self._release(job)
            job.post(("error", job.index, error))

    def _release(self, job: Job) -> None:
        job.done = True
        with self._lock:
            self._active -= 1
