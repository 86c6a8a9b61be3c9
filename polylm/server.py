"""`polylm serve`: an OpenAI-compatible HTTP API (starlette on uvicorn) over the continuous-batching scheduler.

One worker thread (`Engine`) owns the model and its `Scheduler`: it takes prompts and cancellations from a
thread-safe inbox, runs steps while there is work, turns tokens into text (stop strings included) and posts
each request's events onto that request's asyncio queue. HTTP handlers only parse, queue and format, so the
event loop never waits on the model. A client that goes away cancels its requests at once, which frees their
rows for the next step; a full queue answers 429.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import queue
import signal
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .errors import InputError, PolylmError
from .generation import MAX_TOP_LOGPROBS, Sampling, TextStream, TokenChoice
from .model import Model
from .scheduler import STOP, Output, Scheduler

log = logging.getLogger("polylm.server")

#: Default prompt-prefix length worth reusing from the cache (shorter prefixes are recomputed).
MIN_PREFIX = 16
#: Slots of the server's cache when the model's context is longer (a single longer request gets its own).
MAX_CACHE_SLOTS = 4096


class ApiError(Exception):
    """An error answered to the client as OpenAI does: a status and {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


# -- the worker --------------------------------------------------------------------------------------------------


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


# -- request parsing ---------------------------------------------------------------------------------------------

_JSON_TYPES = {str: "a string", bool: "a boolean", int: "an integer", float: "a number", list: "an array",
               dict: "an object"}


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    for kind, name in ((bool, "boolean"), (int, "integer"), (float, "number"), (str, "string"), (list, "array"),
                       (dict, "object")):
        if isinstance(value, kind):
            return name
    return type(value).__name__


def _field(body: dict, name: str, kind: type, default: Any = None, *, low: float | None = None,
           high: float | None = None) -> Any:
    """`body[name]` checked against a JSON type (and range); absent or null gives `default`."""
    value = body.get(name)
    if value is None:
        return default
    ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok:
        raise ApiError(400, f"'{name}' must be {_JSON_TYPES[kind]}, got {_json_type(value)}", param=name)
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"≥ {low}" if high is None else f"between {low} and {high}"
        raise ApiError(400, f"'{name}' must be {bounds}, got {value}", param=name)
    return value


@dataclass
class Params:
    """What one completion request asks for, validated."""

    prompts: list[list[int]]
    sampling: Sampling
    stop: list[str]
    stream: bool
    include_usage: bool
    top_logprobs: int | None  # None: no logprobs
    chat: bool


def _sampling_params(body: dict, model: Model, chat: bool, longest_prompt: int) -> tuple[Sampling, list[str], int | None]:
    room = model.ir.context_length - longest_prompt
    max_tokens = _field(body, "max_tokens", int, None, low=0)
    if chat:
        max_tokens = _field(body, "max_completion_tokens", int, max_tokens, low=0)
    if max_tokens is None:
        max_tokens = room if chat else 16
    temperature = _field(body, "temperature", float, 1.0, low=0, high=2)
    top_p = _field(body, "top_p", float, None, low=0, high=1)
    if top_p == 0:  # only the most likely token is left: greedy
        temperature, top_p = 0.0, None
    top_k = _field(body, "top_k", int, None, low=-1)
    seed = _field(body, "seed", int)
    for name in ("presence_penalty", "frequency_penalty"):
        if _field(body, name, float, 0.0, low=-2, high=2) != 0:
            raise ApiError(400, f"'{name}' is not supported (use repetition_penalty)", param=name)
    if _field(body, "n", int, 1) != 1:
        raise ApiError(400, "'n' must be 1", param="n")
    if _field(body, "logit_bias", dict, {}):
        raise ApiError(400, "'logit_bias' is not supported", param="logit_bias")
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop
    if stops is not None and not (isinstance(stops, list) and all(isinstance(s, str) for s in stops)):
        raise ApiError(400, f"'stop' must be a string or an array of strings, got {_json_type(stop)}", param="stop")
    if chat:
        logprobs = _field(body, "logprobs", bool, False)
        top = _field(body, "top_logprobs", int, None, low=0, high=MAX_TOP_LOGPROBS)
        if top is not None and not logprobs:
            raise ApiError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        top_logprobs = (top or 0) if logprobs else None
    else:
        top_logprobs = _field(body, "logprobs", int, None, low=0, high=MAX_TOP_LOGPROBS)
    try:
        sampling = Sampling(max_new_tokens=max_tokens, temperature=float(temperature), top_k=max(top_k or 0, 0),
                            top_p=top_p, seed=None if seed is None else seed % 2 ** 63,
                            min_p=_field(body, "min_p", float, None, low=0, high=1),
                            repetition_penalty=_field(body, "repetition_penalty", float, 1.0),
                            logprobs=top_logprobs)
    except InputError as exc:
        raise ApiError(400, str(exc)) from None
    return sampling, [s for s in stops or [] if s], top_logprobs


def _check_model(body: dict, name: str) -> None:
    requested = body.get("model")
    if not isinstance(requested, str):
        raise ApiError(400, "'model' is required and must be a string" if requested is None else
                       f"'model' must be a string, got {_json_type(requested)}", param="model")
    if requested != name:
        raise ApiError(404, f"the model '{requested}' does not exist; this server serves '{name}'", param="model",
                       code="model_not_found")


def _check_context(prompts: list[list[int]], model: Model, param: str) -> None:
    limit = model.ir.context_length
    for prompt in prompts:
        if len(prompt) >= limit:
            raise ApiError(400, f"this model's maximum context length is {limit} tokens, but the prompt has "
                                f"{len(prompt)} tokens (at most {limit - 1} leave room for a reply)",
                           param=param, code="context_length_exceeded")


def _completion_prompts(body: dict, model: Model) -> list[list[int]]:
    prompt = body.get("prompt")
    vocab = model.ir.embedding.vocab_size

    def is_ids(value: Any) -> bool:
        return isinstance(value, list) and bool(value) and all(isinstance(t, int) and not isinstance(t, bool)
                                                               for t in value)

    if isinstance(prompt, str):
        items: list[Any] = [prompt]
    elif is_ids(prompt):
        items = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) or is_ids(p) for p in prompt):
        items = prompt
    else:
        raise ApiError(400, "'prompt' must be a string, an array of strings, an array of token ids or an array of "
                            f"such arrays, got {_json_type(prompt)}", param="prompt")
    prompts = []
    for item in items:
        if isinstance(item, str):
            if model.tokenizer is None:
                raise ApiError(400, "this model has no tokenizer; send token ids", param="prompt")
            item = model.tokenizer.encode(item) if item else []
        if not item:
            raise ApiError(400, "'prompt' is empty", param="prompt")
        bad = [t for t in item if not 0 <= t < vocab]
        if bad:
            raise ApiError(400, f"token id {bad[0]} is outside the vocabulary [0, {vocab})", param="prompt")
        prompts.append(list(item))
    return prompts


def _chat_prompt(body: dict, model: Model) -> list[int]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty array of messages", param="messages")
    rendered = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ApiError(400, f"messages[{i}] must be an object with a string 'role'", param=f"messages[{i}]")
        content = message.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise ApiError(400, f"messages[{i}].content: only text parts are supported",
                                   param=f"messages[{i}].content")
                parts.append(part["text"])
            content = "".join(parts)
        elif content is not None and not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string or an array of text parts, got "
                                f"{_json_type(content)}", param=f"messages[{i}].content")
        rendered.append({**message, "content": content or ""})
    try:
        return model.chat_prompt(rendered)
    except PolylmError as exc:
        raise ApiError(400, str(exc), param="messages") from None


def parse(body: Any, model: Model, name: str, *, chat: bool) -> Params:
    """Validate a /v1/completions or /v1/chat/completions body."""
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {_json_type(body)}")
    _check_model(body, name)
    prompts = [_chat_prompt(body, model)] if chat else _completion_prompts(body, model)
    _check_context(prompts, model, "messages" if chat else "prompt")
    if not chat and (_field(body, "echo", bool, False) or body.get("suffix") is not None):
        raise ApiError(400, "'echo' and 'suffix' are not supported", param="echo")
    if not chat and _field(body, "best_of", int, 1) != 1:
        raise ApiError(400, "'best_of' must be 1", param="best_of")
    sampling, stop, top_logprobs = _sampling_params(body, model, chat, max(len(p) for p in prompts))
    stream = _field(body, "stream", bool, False)
    options = _field(body, "stream_options", dict, {})
    include_usage = bool(_field(options, "include_usage", bool, False))
    return Params(prompts, sampling, stop, stream, include_usage, top_logprobs, chat)


# -- responses ---------------------------------------------------------------------------------------------------


@dataclass
class _Choice:
    text: str = ""
    tokens: int = 0
    finish: str | None = None
    logprobs: list[tuple[TokenChoice, int]] = field(default_factory=list)  # with the text offset of each


class _Formatter:
    """Builds OpenAI response objects (whole, or stream chunks) for one request."""

    def __init__(self, params: Params, model: Model, name: str) -> None:
        self.params, self.model, self.name = params, model, name
        self.id = ("chatcmpl-" if params.chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self._token_text: dict[int, str] = {}

    def _text(self, token: int) -> str:
        if token not in self._token_text:
            tokenizer = self.model.tokenizer
            self._token_text[token] = tokenizer.decode([token], skip_special_tokens=False) if tokenizer else str(token)
        return self._token_text[token]

    def logprobs(self, entries: list[tuple[TokenChoice, int]]) -> dict | None:
        if self.params.top_logprobs is None:
            return None
        if self.params.chat:
            def item(token: int, logprob: float) -> dict:
                text = self._text(token)
                return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}
            return {"content": [{**item(c.token, c.logprob), "top_logprobs": [item(t, lp) for t, lp in c.top]}
                                for c, _ in entries]}
        return {"tokens": [self._text(c.token) for c, _ in entries],
                "token_logprobs": [c.logprob for c, _ in entries],
                "top_logprobs": [{self._text(t): lp for t, lp in c.top} for c, _ in entries],
                "text_offset": [offset for _, offset in entries]}

    def usage(self, choices: list[_Choice]) -> dict:
        prompt = sum(len(p) for p in self.params.prompts)
        completion = sum(c.tokens for c in choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def whole(self, choices: list[_Choice]) -> dict:
        if self.params.chat:
            body = [{"index": i, "message": {"role": "assistant", "content": c.text},
                     "logprobs": self.logprobs(c.logprobs), "finish_reason": c.finish} for i, c in enumerate(choices)]
            kind = "chat.completion"
        else:
            body = [{"index": i, "text": c.text, "logprobs": self.logprobs(c.logprobs), "finish_reason": c.finish}
                    for i, c in enumerate(choices)]
            kind = "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.name, "choices": body,
                "usage": self.usage(choices)}

    def chunk(self, index: int, piece: str | None, entries: list, finish: str | None, *, first: bool = False) -> dict:
        if self.params.chat:
            delta: dict = {"role": "assistant", "content": ""} if first else {}
            if piece:
                delta["content"] = piece
            choice = {"index": index, "delta": delta, "logprobs": self.logprobs(entries) if entries else None,
                      "finish_reason": finish}
            kind = "chat.completion.chunk"
        else:
            choice = {"index": index, "text": piece or "", "logprobs": self.logprobs(entries) if entries else None,
                      "finish_reason": finish}
            kind = "text_completion"
        out = {"id": self.id, "object": kind, "created": self.created, "model": self.name, "choices": [choice]}
        if self.params.include_usage:
            out["usage"] = None
        return out

    def usage_chunk(self, choices: list[_Choice]) -> dict:
        kind = "chat.completion.chunk" if self.params.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.name, "choices": [],
                "usage": self.usage(choices)}


def _apply(choice: _Choice, event: tuple) -> list[tuple[TokenChoice, int]]:
    """Fold a token event into its choice; returns the logprob entries it added."""
    _, _, piece, token_choice, finish, count = event
    added = []
    if token_choice is not None and token_choice.logprob is not None:
        added.append((token_choice, len(choice.text)))
        choice.logprobs.extend(added)
    choice.text += piece
    choice.tokens = count
    choice.finish = finish
    return added


def _sse(data: Any) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n".encode("utf-8")


class _EventStream:
    """A server-sent-events response that stops, and calls `on_close`, as soon as the client goes away."""

    def __init__(self, events: AsyncIterator[bytes], on_close: Callable[[], None]) -> None:
        self.events, self.on_close = events, on_close

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                                (b"x-accel-buffering", b"no")]})

        async def stream() -> None:
            async for chunk in self.events:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        async def disconnected() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        tasks = [asyncio.ensure_future(stream()), asyncio.ensure_future(disconnected())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            if tasks[0].done() and not tasks[0].cancelled():
                tasks[0].result()  # OSError: the client left while a chunk was being sent
        except OSError:
            pass
        finally:
            for task in tasks:
                task.cancel()
            self.on_close()
            await asyncio.gather(*tasks, return_exceptions=True)
            with contextlib.suppress(Exception):
                await self.events.aclose()


# -- the app -----------------------------------------------------------------------------------------------------


def create_app(model: Model, *, model_name: str, api_key: str | None = None, max_batch: int = 8,
               max_queue: int = 64, capacity: int | None = None, min_prefix: int | None = MIN_PREFIX) -> Any:
    """The ASGI app; its lifespan starts and stops the worker. `app.state.engine` is the `Engine`."""
    if model.task != "causal-lm":
        raise InputError(f"{model.path} holds a {model.task} model; serving needs a causal-lm checkpoint")
    if model.tokenizer is None:
        raise InputError(f"{model.path}: no tokenizer.json; serving needs one to turn tokens into text")
    engine = Engine(model, max_batch=max_batch, max_queue=max_queue, capacity=capacity, min_prefix=min_prefix)

    def endpoint(handler: Callable[[HttpRequest], Awaitable[Response]], *, auth: bool = True):
        async def run(request: HttpRequest) -> Response:
            try:
                if auth and api_key is not None:
                    given = request.headers.get("authorization", "")
                    if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                        raise ApiError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')",
                                       code="invalid_api_key")
                return await handler(request)
            except ApiError as exc:
                request.scope["polylm.log"] = exc.message
                return exc.response()
            except Exception as exc:  # noqa: BLE001 - the server answers and keeps running
                log.exception("unexpected error")
                return ApiError(500, f"internal error: {exc}", type="server_error").response()
        return run

    async def health(request: HttpRequest) -> Response:
        return JSONResponse({"status": "ok", "model": model_name, **engine.snapshot})

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": 0, "owned_by": "polylm",
                "max_model_len": model.ir.context_length, "backend": model.backend, "dtype": model.dtype}

    async def models(request: HttpRequest) -> Response:
        return JSONResponse({"object": "list", "data": [model_card()]})

    async def one_model(request: HttpRequest) -> Response:
        if request.path_params["name"] != model_name:
            raise ApiError(404, f"the model '{request.path_params['name']}' does not exist", code="model_not_found")
        return JSONResponse(model_card())

    async def completions(request: HttpRequest) -> Response:
        return await _complete(request, chat=False)

    async def chat_completions(request: HttpRequest) -> Response:
        return await _complete(request, chat=True)

    async def _complete(request: HttpRequest, chat: bool) -> Response:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
        params = parse(body, model, model_name, chat=chat)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def post(event: tuple) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is listening
                loop.call_soon_threadsafe(events.put_nowait, event)

        tokenizer = model.tokenizer
        jobs = [Job(i, prompt, params.sampling, TextStream(tokenizer, params.stop), post)
                for i, prompt in enumerate(params.prompts)]
        engine.submit(jobs)
        formatter = _Formatter(params, model, model_name)
        choices = [_Choice() for _ in jobs]
        request.scope["polylm.log"] = "…"

        def note() -> None:
            usage = formatter.usage(choices)
            request.scope["polylm.log"] = (f"prompt={usage['prompt_tokens']} completion={usage['completion_tokens']} "
                                           f"finish={','.join(str(c.finish) for c in choices)}")

        def closed() -> None:
            engine.cancel(jobs)
            if any(c.finish is None for c in choices):
                request.scope["polylm.log"] = f"client left after {sum(c.tokens for c in choices)} tokens"

        if params.stream:
            return _EventStream(_stream(events, jobs, choices, formatter, note), closed)
        try:
            complete = await _collect(request, events, choices)
        except BaseException:
            engine.cancel(jobs)
            raise
        if not complete:
            closed()
            return Response(status_code=499)  # nobody reads it: the client has gone
        note()
        return JSONResponse(formatter.whole(choices))

    async def not_found(request: HttpRequest, exc: HTTPException) -> Response:
        status = exc.status_code
        return ApiError(status, f"{request.method} {request.url.path}: {exc.detail}",
                        type="invalid_request_error" if status < 500 else "server_error").response()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    routes = [
        Route("/health", endpoint(health, auth=False)),
        Route("/v1/models", endpoint(models)),
        Route("/v1/models/{name:path}", endpoint(one_model)),
        Route("/v1/completions", endpoint(completions), methods=["POST"]),
        Route("/v1/chat/completions", endpoint(chat_completions), methods=["POST"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: not_found})
    app.state.engine = engine
    return _LogRequests(app)


async def _collect(request: HttpRequest, events: asyncio.Queue, choices: list[_Choice]) -> bool:
    """Wait for every choice to finish (True), or for the client to leave first (False)."""
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        remaining = len(choices)
        while remaining:
            get = asyncio.ensure_future(events.get())
            await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not get.done():
                get.cancel()
                return False
            event = get.result()
            if event[0] == "error":
                raise event[2]
            _apply(choices[event[1]], event)
            remaining -= event[4] is not None
        return True
    finally:
        gone.cancel()


async def _disconnected(request: HttpRequest) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _stream(events: asyncio.Queue, jobs: list[Job], choices: list[_Choice], formatter: _Formatter,
                  note: Callable[[], None]) -> AsyncIterator[bytes]:
    if formatter.params.chat:
        for job in jobs:
            yield _sse(formatter.chunk(job.index, None, [], None, first=True))
    pending: list[list] = [[] for _ in jobs]
    remaining = len(jobs)
    while remaining:
        event = await events.get()
        if event[0] == "error":
            yield _sse(event[2].body())
            break
        index, piece, finish = event[1], event[2], event[4]
        pending[index] += _apply(choices[index], event)
        if piece or finish is not None or pending[index]:  # with logprobs, every token gets its chunk
            yield _sse(formatter.chunk(index, piece, pending[index], finish))
            pending[index] = []
        remaining -= finish is not None
    else:
        if formatter.params.include_usage:
            yield _sse(formatter.usage_chunk(choices))
    note()
    yield _sse("[DONE]")


class _LogRequests:
    """ASGI middleware: one log line per request, when its response has been sent."""

    def __init__(self, app: Starlette) -> None:
        self.app = app
        self.state = app.state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), [0]

        async def send_status(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            client = scope.get("client") or ("-", 0)
            log.info("%s %s %s %s %.3fs %s", client[0], scope["method"], scope["path"], status[0] or "-",
                     time.perf_counter() - start, scope.get("polylm.log", ""))


# -- running -----------------------------------------------------------------------------------------------------


def bind(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket on host:port (port 0: a free one); InputError when it cannot be had."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        raise InputError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def serve(model: Model, *, model_name: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_batch: int = 8, max_queue: int = 64, min_prefix: int | None = MIN_PREFIX) -> None:
    """Serve `model` until interrupted (uvicorn handles SIGINT/SIGTERM and shuts down gracefully)."""
    import uvicorn

    sock = bind(host, port)
    app = create_app(model, model_name=model_name, api_key=api_key, max_batch=max_batch, max_queue=max_queue,
                     min_prefix=min_prefix)
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    bound_host, bound_port = sock.getsockname()[:2]
    log.info("polylm serving %s (%s, %s) on http://%s:%d/v1 — batch %d, queue %d%s", model_name, model.backend,
             model.dtype, bound_host, bound_port, max_batch, max_queue, ", API key required" if api_key else "")
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
    if threading.current_thread() is threading.main_thread():
        # uvicorn shuts down gracefully on SIGINT/SIGTERM, then raises the signal again: make both end here
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    log.info("polylm server stopped")
