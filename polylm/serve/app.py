"""`polylm serve`: an OpenAI-compatible HTTP API (starlette on uvicorn) over the continuous-batching scheduler.

One worker thread (`Engine`) owns the model and its `Scheduler`: it takes prompts and cancellations from a
thread-safe inbox, runs steps while there is work, turns tokens into text (stop strings included) and posts
each request's events onto that request's asyncio queue. HTTP handlers only read, queue and format: parsing,
tokenizing and chat-template rendering run in a worker thread, so the event loop never waits on the model or on
a large request. A client that goes away cancels its requests at once, which frees their rows for the next step;
a full queue answers 429, a body over `max_body_bytes` 413, a stopped engine 503. Every error, starlette's own
404/405 and unexpected 500s included, has OpenAI's JSON body. `/` is a chat page in the browser (`page.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import signal
import socket
import threading
import time
from typing import Any, AsyncIterator, Awaitable, Callable

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..errors import InputError
from ..generate.stream import TextStream
from ..model import Model
from .engine import MIN_PREFIX, Engine, Job
from .page import chat_page
from .schema import ApiError, Choice, Formatter, apply_event, load_json, parse, sse

log = logging.getLogger("polylm.server")

#: Default limit on a request body's size (413 above it).
MAX_BODY_BYTES = 32 * 1024 * 1024


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
               max_queue: int = 64, capacity: int | None = None, min_prefix: int | None = MIN_PREFIX,
               max_body_bytes: int = MAX_BODY_BYTES) -> Any:
    """The ASGI app; its lifespan starts and stops the worker. `app.state.engine` is the `Engine`."""
    if model.task != "causal-lm":
        raise InputError(f"{model.path} holds a {model.task} model; serving needs a causal-lm checkpoint")
    if model.tokenizer is None:
        raise InputError(f"{model.path}: no tokenizer.json; serving needs one to turn tokens into text")
    engine = Engine(model, max_batch=max_batch, max_queue=max_queue, capacity=capacity, min_prefix=min_prefix)
    key = None if api_key is None else api_key.encode("utf-8", "surrogateescape")  # the bytes given on the CLI

    def endpoint(handler: Callable[[HttpRequest], Awaitable[Response]], *, auth: bool = True):
        async def run(request: HttpRequest) -> Response:
            try:
                if auth and key is not None and not _authorized(request, key):
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

    async def page(request: HttpRequest) -> Response:
        return chat_page()

    async def health(request: HttpRequest) -> Response:
        if engine.failure is not None:
            return JSONResponse({"status": "error", "error": engine.failure, "model": model_name, **engine.snapshot},
                                status_code=503)
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
        raw = await _read_body(request, max_body_bytes)
        params = await run_in_threadpool(lambda: parse(load_json(raw), model, model_name, chat=chat))
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def post(event: tuple) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is listening
                loop.call_soon_threadsafe(events.put_nowait, event)

        tokenizer = model.tokenizer
        jobs = [Job(i, prompt, params.sampling, TextStream(tokenizer, params.stop), post,
                    None if params.echo is None else params.echo[i]) for i, prompt in enumerate(params.prompts)]
        engine.submit(jobs)
        formatter = Formatter(params, model, model_name)
        choices = [Choice() for _ in jobs]
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

    async def http_error(request: HttpRequest, exc: HTTPException) -> Response:
        status = exc.status_code
        response = ApiError(status, f"{request.method} {request.url.path}: {exc.detail}",
                            type="invalid_request_error" if status < 500 else "server_error").response()
        response.headers.update(exc.headers or {})
        return response

    async def server_error(request: HttpRequest, exc: Exception) -> Response:
        return ApiError(500, f"internal error: {type(exc).__name__}", type="server_error").response()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    routes = [
        Route("/", endpoint(page, auth=False)),  # the page is public; the API calls it makes carry the key
        Route("/health", endpoint(health, auth=False)),
        Route("/v1/models", endpoint(models)),
        Route("/v1/models/{name:path}", endpoint(one_model)),
        Route("/v1/completions", endpoint(completions), methods=["POST"]),
        Route("/v1/chat/completions", endpoint(chat_completions), methods=["POST"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={HTTPException: http_error, Exception: server_error})
    app.state.engine = engine
    return _LogRequests(app)


def _authorized(request: HttpRequest, key: bytes) -> bool:
    """Whether the request's Authorization header is `Bearer KEY` (the scheme in any case, RFC 7235), compared
    as bytes, so a key outside ASCII matches a client sending it in UTF-8."""
    given = dict(request.scope["headers"]).get(b"authorization", b"")
    scheme, _, token = given.strip().partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), key)


async def _read_body(request: HttpRequest, limit: int) -> bytes:
    """The request body; ApiError 413 as soon as it is known to be over `limit` bytes."""
    too_large = ApiError(413, f"the request body is over the server's limit of {limit} bytes (--max-body-bytes)",
                         code="request_too_large")
    length = request.headers.get("content-length", "")
    if length.isdigit() and (len(length) > 18 or int(length) > limit):
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


async def _collect(request: HttpRequest, events: asyncio.Queue, choices: list[Choice]) -> bool:
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
            apply_event(choices[event[1]], event)
            remaining -= event[0] == "token" and event[4] is not None
        return True
    finally:
        gone.cancel()


async def _disconnected(request: HttpRequest) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _stream(events: asyncio.Queue, jobs: list[Job], choices: list[Choice], formatter: Formatter,
                  note: Callable[[], None]) -> AsyncIterator[bytes]:
    if formatter.params.chat:
        for job in jobs:
            yield sse(formatter.chunk(job.index, None, [], None, first=True))
    pending: list[list] = [[] for _ in jobs]
    remaining = len(jobs)
    while remaining:
        event = await events.get()
        if event[0] == "error":
            yield sse(event[2].body())
            break
        if event[0] == "prompt":  # the echoed prompt comes first, in a chunk of its own
            yield sse(formatter.chunk(event[1], event[2], apply_event(choices[event[1]], event), None))
            continue
        index, piece, finish = event[1], event[2], event[4]
        pending[index] += apply_event(choices[index], event)
        if piece or finish is not None or pending[index]:  # with logprobs, every token gets its chunk
            yield sse(formatter.chunk(index, piece, pending[index], finish))
            pending[index] = []
        remaining -= finish is not None
    else:
        if formatter.params.include_usage:
            yield sse(formatter.usage_chunk(choices))
    note()
    yield sse("[DONE]")


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
    """A listening TCP socket on host:port (port 0: a free one); InputError when it cannot be had. Connections
    wait in its backlog until the server accepts them."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        raise InputError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def serve(model: Model, *, model_name: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_batch: int = 8, max_queue: int = 64, min_prefix: int | None = MIN_PREFIX,
          max_body_bytes: int = MAX_BODY_BYTES) -> None:
    """Serve `model` until interrupted (uvicorn handles SIGINT/SIGTERM and shuts down gracefully). The
    "serving on" line is logged once the socket listens."""
    import uvicorn

    app = create_app(model, model_name=model_name, api_key=api_key, max_batch=max_batch, max_queue=max_queue,
                     min_prefix=min_prefix, max_body_bytes=max_body_bytes)
    sock = bind(host, port)
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    bound_host, bound_port = sock.getsockname()[:2]
    log.info("polylm serving %s (%s, %s) on http://%s:%d/v1 (chat page: http://%s:%d/) — batch %d, queue %d%s",
             model_name, model.backend, model.dtype, bound_host, bound_port, bound_host, bound_port, max_batch,
             max_queue, ", API key required" if api_key else "")
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
    if threading.current_thread() is threading.main_thread():
        # uvicorn shuts down gracefully on SIGINT/SIGTERM, then raises the signal again: make both end here
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    log.info("polylm server stopped")
