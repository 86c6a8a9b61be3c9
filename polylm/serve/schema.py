"""The OpenAI API's shapes: request parsing with OpenAI's error bodies (`ApiError`), and response objects and
stream chunks (`Formatter`)."""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from starlette.responses import JSONResponse

from ..errors import InputError, PolylmError
from ..generate.sampling import MAX_TOP_LOGPROBS, Sampling, TokenChoice
from ..generate.stream import token_offsets
from ..model import Model


class ApiError(Exception):
    """An error answered to the client as OpenAI does: a status and {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        message = message.encode("utf-8", "backslashreplace").decode("utf-8")  # a lone surrogate shows as \ud800
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


# -- request parsing ---------------------------------------------------------------------------------------------


def load_json(raw: bytes) -> Any:
    """A request body's JSON; ApiError 400 when it is not JSON, or is nested or numbered beyond Python's limits."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise ApiError(400, "the request body is not valid JSON: it is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer over Python's digit limit
        reason = str(exc).split(";")[0]  # not the digit limit's advice to call sys.set_int_max_str_digits
        raise ApiError(400, f"the request body is not valid JSON: {reason}") from None


def _check_unicode(body: Any) -> None:
    """ApiError 400 naming a string (key or value) that holds a lone surrogate: JSON's "\\ud800"
    escape makes one, but it is no text a tokenizer, template or response can take."""
    stack: list[tuple[Any, tuple]] = [(body, ())]
    while stack:
        value, path = stack.pop()
        if isinstance(value, dict):
            stack.extend((item, (path, key)) for key, item in value.items())
            strings = value.keys()
        elif isinstance(value, list):
            stack.extend((item, (path, index)) for index, item in enumerate(value))
            continue
        else:
            strings = (value,) if isinstance(value, str) else ()
        for text in strings:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:
                where = _path_text(path)
                raise ApiError(400, f"{where or 'the request body'} holds a lone surrogate "
                                    f"({text[exc.start]!r} at character {exc.start}), which is not text",
                               param=where or None) from None


def _path_text(path: tuple) -> str:
    """'messages[0].content' for the linked path ((((), 'messages'), 0), 'content')."""
    parts = []
    while path:
        path, key = path
        parts.append(f"[{key}]" if isinstance(key, int) else f".{key}")
    return "".join(reversed(parts)).lstrip(".")

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
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
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
    #: with `echo`, each prompt's text and (with logprobs) where each of its tokens starts in it
    echo: list[tuple[str, list[int]]] | None = None


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


def _completion_prompts(body: dict, model: Model) -> tuple[list[list[int]], list[str | None]]:
    """Each prompt's token ids, and its text when it was given as text."""
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
    prompts, texts = [], []
    for item in items:
        texts.append(item if isinstance(item, str) else None)
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
    return prompts, texts


def _echo(prompts: list[list[int]], texts: list[str | None], model: Model,
          logprobs: bool) -> list[tuple[str, list[int]]]:
    """What `echo` answers first: each prompt's text as given (or decoded from its ids), and with logprobs each
    token's offset in the decoded text."""
    tokenizer = model.tokenizer
    return [(tokenizer.decode(ids) if text is None else text, token_offsets(tokenizer, ids) if logprobs else [])
            for ids, text in zip(prompts, texts)]


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
    except Exception as exc:  # noqa: BLE001 - a template may fail in any way on the messages it is given
        raise ApiError(400, f"the chat template failed on these messages ({type(exc).__name__}: {exc})",
                       param="messages") from None


def parse(body: Any, model: Model, name: str, *, chat: bool) -> Params:
    """Validate a /v1/completions or /v1/chat/completions body (tokenizing and rendering it: call it off the
    event loop); ApiError 4xx when it is not valid."""
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {_json_type(body)}")
    _check_unicode(body)
    _check_model(body, name)
    prompts, texts = ([_chat_prompt(body, model)], [None]) if chat else _completion_prompts(body, model)
    _check_context(prompts, model, "messages" if chat else "prompt")
    if not chat and body.get("suffix") is not None:
        raise ApiError(400, "'suffix' is not supported", param="suffix")
    if not chat and _field(body, "best_of", int, 1) != 1:
        raise ApiError(400, "'best_of' must be 1", param="best_of")
    echo = not chat and _field(body, "echo", bool, False)
    sampling, stop, top_logprobs = _sampling_params(body, model, chat, max(len(p) for p in prompts))
    stream = _field(body, "stream", bool, False)
    options = _field(body, "stream_options", dict, {})
    include_usage = bool(_field(options, "include_usage", bool, False))
    return Params(prompts, sampling, stop, stream, include_usage, top_logprobs, chat,
                  _echo(prompts, texts, model, top_logprobs is not None) if echo else None)


# -- responses ---------------------------------------------------------------------------------------------------

#: The logprob reported for a token the model rules out (JSON has no -Infinity).
MIN_LOGPROB = -9999.0


@dataclass
class Choice:
    text: str = ""
    tokens: int = 0
    finish: str | None = None
    logprobs: list[tuple[TokenChoice, int]] = field(default_factory=list)  # with the text offset of each


class Formatter:
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
                return {"token": text, "logprob": _json_logprob(logprob), "bytes": list(text.encode("utf-8"))}
            return {"content": [{**item(c.token, c.logprob), "top_logprobs": [item(t, lp) for t, lp in c.top]}
                                for c, _ in entries]}
        # an echoed prompt's first token follows nothing: its logprob and alternatives are null
        return {"tokens": [self._text(c.token) for c, _ in entries],
                "token_logprobs": [None if c.logprob is None else _json_logprob(c.logprob) for c, _ in entries],
                "top_logprobs": [None if c.logprob is None else {self._text(t): _json_logprob(lp) for t, lp in c.top}
                                 for c, _ in entries],
                "text_offset": [offset for _, offset in entries]}

    def usage(self, choices: list[Choice]) -> dict:
        prompt = sum(len(p) for p in self.params.prompts)
        completion = sum(c.tokens for c in choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def whole(self, choices: list[Choice]) -> dict:
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

    def usage_chunk(self, choices: list[Choice]) -> dict:
        kind = "chat.completion.chunk" if self.params.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.name, "choices": [],
                "usage": self.usage(choices)}


def _json_logprob(logprob: float) -> float:
    """A logprob JSON can carry: -inf (a token the model rules out) becomes -9999.0, as in vLLM."""
    return max(logprob, MIN_LOGPROB)


def apply_event(choice: Choice, event: tuple) -> list[tuple[TokenChoice, int]]:
    """Fold a token or echoed-prompt event into its choice; returns the logprob entries it added."""
    if event[0] == "prompt":
        _, _, choice.text, entries = event
        choice.logprobs = list(entries)
        return choice.logprobs[:]
    _, _, piece, token_choice, finish, count = event
    added = []
    if token_choice is not None and token_choice.logprob is not None:
        added.append((token_choice, len(choice.text)))
        choice.logprobs.extend(added)
    choice.text += piece
    choice.tokens = count
    choice.finish = finish
    return added


def sse(data: Any) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n".encode("utf-8")
