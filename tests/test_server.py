"""`polylm serve` driven with the real `openai` client: chat and completions, streamed and not, stop strings,
logprobs, errors, concurrency (each client gets what it gets alone), disconnects and a full queue; reliability:
extreme sampling values, requests that fail alone, an engine that survives exceptions and reports its death,
a loop that large requests do not block, body limits, and a soak of good, bad and abandoned requests.

Servers run in-process on 127.0.0.1 and a free port (the torch backend, tiny checkpoints); fixtures always stop them.
"""

import contextlib
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
import uvicorn

import polylm
from polylm.backend import Runtime
from polylm.cli import main
from polylm.generate.sampling import log_softmax
from polylm.serve.app import bind, create_app

NAME = "tiny-helium"
KEY = "sekret"
SMALL_BODY_LIMIT = 1 << 20
TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Once upon a time"}]


@contextlib.contextmanager
def running(model, **options):
    """The server on a free 127.0.0.1 port in a thread: yields (base URL, engine); always shuts it down."""
    app = create_app(model, model_name=NAME, **options)
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", app.state.engine
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()


@pytest.fixture(scope="module")
def checkpoint(make_ckpt, tmp_path_factory):
    directory = tmp_path_factory.mktemp("chat") / "helium"
    shutil.copytree(make_ckpt("helium"), directory)
    (directory / "chat_template.jinja").write_text(TEMPLATE)
    return directory


@pytest.fixture(scope="module")
def model(checkpoint):
    return polylm.load(checkpoint, backend="torch")


@pytest.fixture(scope="module")
def server(model):
    with running(model, api_key=KEY, max_batch=4, min_prefix=4, max_body_bytes=SMALL_BODY_LIMIT) as (url, engine):
        yield url, engine


@pytest.fixture(scope="module")
def plain(model):
    """A server with the default options (no key, 32 MiB bodies): (base URL, engine)."""
    with running(model) as served:
        yield served


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=60)


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [NAME]
    health = httpx.get(server[0] + "/health").json()  # no key needed
    assert health["status"] == "ok" and health["model"] == NAME


def test_chat_matches_model_chat(client, model):
    expected = model.chat(MESSAGES, max_new_tokens=12)
    reply = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=12, temperature=0)
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected
    assert reply.usage.prompt_tokens == len(model.chat_prompt(MESSAGES))
    assert choice.finish_reason == ("length" if reply.usage.completion_tokens == 12 else "stop")
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    again = client.chat.completions.create(model=NAME, messages=MESSAGES, max_completion_tokens=12, temperature=0)
    assert again.choices[0].message.content == expected  # served from the reused prefix this time

    chunks = list(client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == reply.usage.completion_tokens


def test_completions_match_model_generate(client, model):
    prompts = ["Once upon a time", "The quick brown fox"]
    expected = [model.generate(p, max_new_tokens=10) for p in prompts]
    reply = client.completions.create(model=NAME, prompt=prompts[0], max_tokens=10, temperature=0)
    assert reply.choices[0].text == expected[0] and reply.object == "text_completion"
    batch = client.completions.create(model=NAME, prompt=prompts, max_tokens=10, temperature=0)
    assert [c.text for c in sorted(batch.choices, key=lambda c: c.index)] == expected
    ids = model.tokenizer.encode(prompts[1])
    assert client.completions.create(model=NAME, prompt=ids, max_tokens=10, temperature=0).choices[0].text == expected[1]
    streamed = list(client.completions.create(model=NAME, prompt=prompts[0], max_tokens=10, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == expected[0]
    assert streamed[-1].choices[0].finish_reason == reply.choices[0].finish_reason


def test_stream_is_server_sent_events_ending_in_done(server):
    body = {"model": NAME, "prompt": "Once upon", "max_tokens": 4, "temperature": 0, "stream": True}
    with httpx.stream("POST", server[0] + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events) and events[-1] == "data: [DONE]"
    assert all("choices" in json.loads(line[6:]) for line in events[:-1])


def test_stop_strings(client, model):
    full = model.generate("Once upon", max_new_tokens=16)
    stop = full[3:5]
    expected = full[:full.index(stop)]
    assert model.generate("Once upon", max_new_tokens=16, stop=stop) == expected
    reply = client.completions.create(model=NAME, prompt="Once upon", max_tokens=16, temperature=0, stop=[stop, "zzz"])
    assert reply.choices[0].text == expected and reply.choices[0].finish_reason == "stop"
    streamed = list(client.completions.create(model=NAME, prompt="Once upon", max_tokens=16, temperature=0,
                                              stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == expected
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_logprobs(client, model):
    prompt = "Once upon a time"
    reply = client.completions.create(model=NAME, prompt=prompt, max_tokens=5, temperature=0, logprobs=3)
    logprobs = reply.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == reply.usage.completion_tokens
    assert all(len(top) <= 3 for top in logprobs.top_logprobs)
    first = log_softmax(model.forward([model.tokenizer.encode(prompt)])[0, -1])
    assert logprobs.token_logprobs[0] == pytest.approx(first.max(), abs=1e-4)
    assert sorted(logprobs.top_logprobs[0].values(), reverse=True) == pytest.approx(np.sort(first)[::-1][:3], abs=1e-4)

    chat = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=4, temperature=0, logprobs=True,
                                          top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob for t in content)
    assert all(t.logprob == pytest.approx(t.top_logprobs[0].logprob) for t in content)  # greedy picks the top
    plain = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=2, temperature=0)
    assert plain.choices[0].logprobs is None


def test_seeded_sampling_is_reproducible(client):
    def sample(seed):
        return client.completions.create(model=NAME, prompt="Once", max_tokens=12, temperature=1.0, top_p=0.95,
                                         seed=seed, extra_body={"min_p": 0.01, "repetition_penalty": 1.1})
    assert sample(5).choices[0].text == sample(5).choices[0].text
    assert len({sample(s).choices[0].text for s in range(4)}) > 1


@pytest.mark.parametrize("body,status,param,words", [
    (b"{not json", 400, None, ["not valid JSON"]),
    ([1, 2], 400, None, ["must be a JSON object"]),
    ({"prompt": "hi"}, 400, "model", ["'model' is required"]),
    ({"model": NAME, "prompt": "hi", "temperature": "hot"}, 400, "temperature", ["must be a number", "string"]),
    ({"model": NAME, "prompt": "hi", "max_tokens": -1}, 400, "max_tokens", ["≥ 0"]),
    ({"model": NAME, "prompt": "hi", "max_tokens": 2.5}, 400, "max_tokens", ["must be an integer"]),
    ({"model": NAME, "prompt": "hi", "stop": 3}, 400, "stop", ["'stop'"]),
    ({"model": NAME, "prompt": 5}, 400, "prompt", ["'prompt' must be"]),
    ({"model": NAME, "prompt": [1, 99999]}, 400, "prompt", ["token id 99999"]),
    ({"model": NAME, "prompt": "hi", "stream": "yes"}, 400, "stream", ["boolean"]),
    ({"model": NAME, "prompt": "hi", "n": 2}, 400, "n", ["'n' must be 1"]),
    ({"model": "gpt-4", "prompt": "hi"}, 404, "model", ["'gpt-4' does not exist"]),
    ({"model": NAME, "prompt": [1] * 300}, 400, "prompt", ["maximum context length is 256 tokens", "300"]),
    (b'{"model": "tiny-helium", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, None, ["nested too deeply"]),
    (b'{"model": "tiny-helium", "prompt": "hi", "max_tokens": 1' + b"0" * 5000 + b"}", 400, None,
     ["not valid JSON", "4300 digits"]),
    (b'{"model": "tiny-helium", "prompt": "\\ud800"}', 400, "prompt", ["lone surrogate", "'\\ud800'"]),
    (b'{"model": "tiny-helium", "prompt": ["ok", "a\\udfffb"]}', 400, "prompt[1]", ["lone surrogate", "character 1"]),
    (b'{"model": "\\ud800", "prompt": "hi"}', 400, "model", ["lone surrogate"]),
    (b'{"model": "tiny-helium", "prompt": "hi", "\\ud800": 1}', 400, None, ["lone surrogate"]),
    (b'{"model": "tiny-helium", "prompt": "hi", "temperature": NaN}', 400, "temperature", ["must be a number"]),
    (b'{"model": "tiny-helium", "prompt": "hi", "top_p": Infinity}', 400, "top_p", ["must be a number"]),
    (b'{"model": "tiny-helium", "prompt": "hi", "repetition_penalty": 0}', 400, None, ["repetition_penalty"]),
    (b'{"model": "tiny-helium", "prompt": "\xff"}', 400, None, ["not valid JSON"]),
])
def test_bad_completion_requests(server, body, status, param, words):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(server[0] + "/v1/completions", content=content,
                          headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    assert all(word in error["message"] for word in words), error["message"]


@pytest.mark.parametrize("body,words", [
    ({"messages": "hi"}, ["'messages' must be a non-empty array"]),
    ({"messages": [{"content": "hi"}]}, ["'role'"]),
    ({"messages": [{"role": "user", "content": 7}]}, ["content must be a string"]),
    ({"messages": MESSAGES, "logprobs": 1}, ["'logprobs' must be a boolean"]),
    ({"messages": MESSAGES, "top_logprobs": 2}, ["needs 'logprobs': true"]),
    ({"messages": [{"role": "user", "content": "word " * 300}]}, ["maximum context length is 256 tokens"]),
])
def test_bad_chat_requests(client, body, words):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=NAME, **body)
    assert caught.value.status_code == 400
    assert all(word in caught.value.body["message"] for word in words), caught.value.body


@pytest.mark.parametrize("messages,param", [
    ([{"role": "user", "content": "\ud800"}], "messages[0].content"),
    ([MESSAGES[0], {"role": "\udc80", "content": "hi"}], "messages[1].role"),
    ([{"role": "user", "content": [{"type": "text", "text": "a\ud800"}]}], "messages[0].content[0].text"),
])
def test_chat_with_lone_surrogates_is_a_400(server, messages, param):
    """Clients that escape a lone surrogate in JSON (the openai client cannot even encode one) get a 400."""
    content = json.dumps({"model": NAME, "messages": messages}).encode()  # "\ud800" escapes
    response = httpx.post(server[0] + "/v1/chat/completions", content=content,
                          headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 400 and response.json()["error"]["param"] == param
    assert "lone surrogate" in response.json()["error"]["message"]


def test_api_key_and_unknown_routes(server, client):
    bad = openai.OpenAI(base_url=server[0] + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        bad.models.list()
    assert caught.value.body["code"] == "invalid_api_key"
    missing = httpx.post(server[0] + "/v1/completions", json={"model": NAME, "prompt": "hi"})
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="hi", max_tokens=2)
    unknown = httpx.get(server[0] + "/v1/nothing", headers={"Authorization": f"Bearer {KEY}"})
    assert unknown.status_code == 404 and "error" in unknown.json()
    wrong_method = httpx.get(server[0] + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"})
    assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"
    assert set(wrong_method.json()["error"]) == {"message", "type", "param", "code"}
    for scheme in ("bearer", "BEARER", "Bearer "):  # RFC 7235: the scheme is case-insensitive
        lower = httpx.get(server[0] + "/v1/models", headers={"Authorization": f"{scheme} {KEY}"})
        assert lower.status_code == 200, scheme
    assert httpx.get(server[0] + "/v1/models", headers={"Authorization": KEY}).status_code == 401
    assert client.completions.create(model=NAME, prompt="hi", max_tokens=2).usage.completion_tokens <= 2  # still up


def test_16_concurrent_streaming_clients_each_get_what_they_get_alone(client, model):
    words = "Once upon a time there was a little model that could The quick brown fox jumps".split()
    prompts = [" ".join(words[i % 7: i % 7 + 1 + i % 5]) + f" {i}" for i in range(16)]
    lengths = [6 + i % 7 for i in range(16)]
    expected = [model.generate(p, max_new_tokens=n) for p, n in zip(prompts, lengths)]

    def stream(i):
        chunks = client.completions.create(model=NAME, prompt=prompts[i], max_tokens=lengths[i], temperature=0,
                                           stream=True)
        return "".join(c.choices[0].text for c in chunks)

    with ThreadPoolExecutor(16) as pool:
        assert list(pool.map(stream, range(16))) == expected


@pytest.fixture
def slow_server(checkpoint):
    """One row, a queue of one, and steps slowed to 20 ms, so requests are reliably running or waiting."""
    model = polylm.load(checkpoint, backend="torch")
    with running(model, max_batch=1, max_queue=1) as (url, engine):
        step = engine.scheduler.step

        def slow_step():
            time.sleep(0.02)
            return step()
        engine.scheduler.step = slow_step
        yield url, engine


def _wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_disconnects_free_rows_and_a_full_queue_answers_429(slow_server):
    url, engine = slow_server
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
    long = dict(model=NAME, prompt="Once upon a time", max_tokens=200, temperature=0)
    stream = client.completions.create(stream=True, **long)
    next(iter(stream))  # running: it holds the only row
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(client.completions.create, model=NAME, prompt="Paris", max_tokens=3, temperature=0)
        _wait_for(lambda: httpx.get(url + "/health").json()["waiting"] == 1)
        with pytest.raises(openai.RateLimitError) as caught:
            client.completions.create(model=NAME, prompt="hi", max_tokens=2)
        assert caught.value.status_code == 429 and caught.value.body["code"] == "queue_full"
        started = time.monotonic()
        stream.close()  # the client goes away mid-stream: its row goes to the waiting request at once
        assert waiting.result(timeout=30).usage.completion_tokens <= 3
    assert time.monotonic() - started < 3  # far less than the 200 × 20 ms the abandoned stream had left
    assert engine.snapshot["generated_tokens"] < 100

    # a non-streaming client that gives up frees its row too
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/completions", json=long, timeout=0.5)
    _wait_for(lambda: httpx.get(url + "/health").json()["running"] == 0, timeout=3)
    assert client.completions.create(model=NAME, prompt="hi", max_tokens=2, temperature=0).choices


def test_cli_serve_runs_and_stops(checkpoint):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    process = subprocess.Popen([sys.executable, "-m", "polylm", "serve", "--model", str(checkpoint), "--backend",
                                "torch", "--port", "0"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = process.stderr.readline()
        port = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
        assert port, line
        socket.create_connection(("127.0.0.1", int(port.group(1))), timeout=5).close()  # listening already
        assert httpx.get(f"http://127.0.0.1:{port.group(1)}/health", timeout=30).json()["status"] == "ok"
        reply = httpx.post(f"http://127.0.0.1:{port.group(1)}/v1/completions", timeout=30,
                           json={"model": str(checkpoint), "prompt": "Once", "max_tokens": 3})
        assert reply.status_code == 200
        assert "GET /health 200" in process.stderr.readline()  # one log line per request
        assert re.search(r"POST /v1/completions 200 .* completion=\d", process.stderr.readline())
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    assert process.returncode == 0


@pytest.mark.parametrize("args,message", [
    (["--port", "70000"], "--port must be ≥ 0 and ≤ 65535"),
    (["--max-batch", "0"], "--max-batch must be ≥ 1"),
    (["--host", "256.1.1.1"], "cannot listen on 256.1.1.1:8000"),
    (["--max-body-bytes", "0"], "--max-body-bytes must be ≥ 1"),
])
def test_cli_serve_user_errors_exit_2(checkpoint, capsys, args, message):
    assert main(["serve", "--model", str(checkpoint), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


# -- reliability -------------------------------------------------------------------------------------------------


def test_extreme_sampling_values_complete(client, model):
    greedy = model.generate("Once", max_new_tokens=5)
    for extra in ({"temperature": 1e-320}, {"temperature": 5e-324, "top_p": 1e-300, "extra_body": {"min_p": 1.0}}):
        reply = client.completions.create(model=NAME, prompt="Once", max_tokens=5, seed=1, **extra)
        assert reply.choices[0].text == greedy  # a vanishing temperature picks the best token
    for penalty in (1e-320, 1e300):
        reply = client.completions.create(model=NAME, prompt="Once", max_tokens=5, temperature=1, seed=1,
                                          extra_body={"repetition_penalty": penalty})
        assert reply.usage.completion_tokens == 5 or reply.choices[0].finish_reason == "stop"
    assert model.generate("Once", max_new_tokens=5, temperature=1e-310) == greedy  # the library too


def test_body_limit_answers_413(server):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    big = json.dumps({"model": NAME, "prompt": "x" * SMALL_BODY_LIMIT}).encode()
    response = httpx.post(server[0] + "/v1/completions", content=big, headers=headers)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    assert str(SMALL_BODY_LIMIT) in response.json()["error"]["message"]
    chunks = (big[i:i + 65536] for i in range(0, len(big), 65536))  # no Content-Length: counted as it comes
    response = httpx.post(server[0] + "/v1/completions", content=chunks, headers=headers)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"


def _health_answers_while(url, send) -> tuple[int, float, httpx.Response]:
    """(/health answers given while `send` ran, seconds it took, its response), /health polled meanwhile."""
    with ThreadPoolExecutor(1) as pool:
        started = time.monotonic()
        future = pool.submit(send)
        answers = 0
        while not future.done():
            assert httpx.get(url + "/health", timeout=30).status_code == 200
            answers += not future.done()
            time.sleep(0.02)
        return answers, time.monotonic() - started, future.result()


@pytest.mark.parametrize("body", [
    {"model": NAME, "prompt": "Once upon a time there was a little model. " * 8_000},  # 350 kB to tokenize
    {"model": NAME, "messages": [{"role": "user", "content": "hi"}] * 20_000},  # a template to render
], ids=["long-prompt", "many-messages"])
def test_tokenizing_and_rendering_do_not_block_the_loop(plain, body):
    url = plain[0]
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    answers, took, response = _health_answers_while(url, lambda: httpx.post(url + path, json=body, timeout=60))
    assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"
    assert answers >= 3, (answers, took)  # a blocked loop answers at most the poll in flight until it is done


def replace_forward(monkeypatch, runtime, forward):
    """Make `runtime`'s head outputs `forward`'s, for the scheduler's `forward_top` too (core's reference then
    reduces them)."""
    monkeypatch.setattr(runtime, "forward", forward)
    monkeypatch.setattr(runtime, "forward_top", lambda step, cache, reduce: Runtime.forward_top(runtime, step, cache,
                                                                                               reduce))


def test_a_prompt_with_nan_logits_fails_alone(plain, model, monkeypatch):
    """A request whose logits are NaN gets a 500 naming them; the request running beside it is unharmed."""
    url, engine = plain
    expected = model.generate("Once upon", max_new_tokens=30)
    assert 7 not in model.tokenizer.encode("Once upon")
    forward = model.runtime.forward

    def poisoned(step, cache):
        logits = np.array(forward(step, cache))
        logits[(step.input_ids == 7).sum(axis=1) >= 3] = np.nan  # the row joining with [1, 7, 7, 7]
        return logits
    replace_forward(monkeypatch, model.runtime, poisoned)
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
    stream = iter(client.completions.create(model=NAME, prompt="Once upon", max_tokens=30, temperature=0,
                                            stream=True))
    first = next(stream)
    for temperature in (0, 1):
        with pytest.raises(openai.InternalServerError) as caught:
            client.completions.create(model=NAME, prompt=[1, 7, 7, 7], max_tokens=5, temperature=temperature)
        assert "logits hold NaN" in caught.value.body["message"]
        assert caught.value.body["code"] == "generation_failed"
    text = first.choices[0].text + "".join(c.choices[0].text for c in stream)
    assert text == expected  # what the model makes alone
    _wait_for(lambda: httpx.get(url + "/health").json()["running"] == 0)
    assert engine.failure is None and engine._active == 0


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(plain, model, monkeypatch):
    url, engine = plain
    forward, calls = model.runtime.forward, []

    def failing(step, cache):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("device lost")
        return forward(step, cache)
    replace_forward(monkeypatch, model.runtime, failing)
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
    with pytest.raises(openai.InternalServerError) as caught:  # both prompts run in the failing step
        client.completions.create(model=NAME, prompt=["Once upon", "The quick"], max_tokens=10, temperature=0)
    assert "device lost" in caught.value.body["message"] and "RuntimeError" in caught.value.body["message"]
    health = httpx.get(url + "/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    reply = client.completions.create(model=NAME, prompt="Once upon", max_tokens=4, temperature=0)
    assert reply.choices[0].text == model.generate("Once upon", max_new_tokens=4)
    _wait_for(lambda: httpx.get(url + "/health").json()["running"] == 0)
    assert engine._active == 0


class _Fatal(BaseException):
    """Something no `except Exception` stops: the engine thread ends."""


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_engine_fails_its_requests_and_health_says_so(model):
    with running(model, max_batch=1, max_queue=2) as (url, engine):
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
        stream = iter(client.completions.create(model=NAME, prompt="Once", max_tokens=200, temperature=0,
                                                stream=True))
        next(stream)

        def dying():
            time.sleep(0.3)  # long enough for a second request to be waiting
            raise _Fatal("boom")
        engine.scheduler.step = dying
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(httpx.post, url + "/v1/completions", timeout=30,
                                  json={"model": NAME, "prompt": "Paris", "max_tokens": 3})
            assert waiting.result().status_code == 503  # failed at once when the engine died, no hang
        with pytest.raises(openai.APIError, match="_Fatal"):  # the running stream ends with the error, no hang
            list(stream)
        health = httpx.get(url + "/health")
        assert health.status_code == 503 and health.json()["status"] == "error" and "_Fatal" in health.json()["error"]
        started = time.monotonic()
        refused = httpx.post(url + "/v1/completions", json={"model": NAME, "prompt": "hi", "max_tokens": 2}, timeout=30)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "engine_stopped"
        assert time.monotonic() - started < 2


def test_max_queue_0_and_oversized_prompt_lists_and_a_utf8_key(model):
    key = "clé-🔑"
    with running(model, max_batch=2, max_queue=0, api_key=key) as (url, engine):
        headers = {"Authorization": f"Bearer {key}".encode()}
        reply = httpx.post(url + "/v1/completions", headers=headers, timeout=30,
                           json={"model": NAME, "prompt": ["Once", "Paris"], "max_tokens": 2})
        assert reply.status_code == 200 and len(reply.json()["choices"]) == 2  # idle: admitted, nothing waits
        too_many = httpx.post(url + "/v1/completions", headers=headers, timeout=30,
                              json={"model": NAME, "prompt": ["a", "b", "c"], "max_tokens": 2})
        assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "prompt"
        assert "at most 2" in too_many.json()["error"]["message"]
        wrong = httpx.get(url + "/v1/models", headers={"Authorization": b"Bearer cl\xe9-\xf0\x9f\x94\x91"})
        assert wrong.status_code == 401  # the key's latin-1 bytes are not its UTF-8 bytes
        assert engine._active == 0


def test_unexpected_errors_answer_openai_json(server, monkeypatch):
    url, engine = server

    def broken(jobs):
        raise KeyError("surprise")
    monkeypatch.setattr(engine, "submit", broken)
    response = httpx.post(url + "/v1/completions", json={"model": NAME, "prompt": "hi"},
                          headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 500 and response.json()["error"]["type"] == "server_error"


def _rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


BAD_BODIES = [
    b"{not json", b"[" * 5000 + b"]" * 5000, b'{"model": "tiny-helium", "prompt": "hi", "max_tokens": 1' + b"0" * 5000 + b"}",
    b'{"model": "tiny-helium", "prompt": "\\ud800"}', b'{"model": "\\ud800", "prompt": "hi"}',
    b'{"model": "tiny-helium", "messages": [{"role": "user", "content": "\\udfff"}]}',
    b'{"model": "other", "prompt": "hi"}', b'{"model": "tiny-helium", "prompt": "hi", "temperature": 7}',
    b'{"model": "tiny-helium", "prompt": [1, 99999]}',
]


def test_soak_good_bad_and_abandoned_requests_leak_nothing(plain, model):
    url, engine = plain
    expected = model.generate("Once upon", max_new_tokens=4)
    body = {"model": NAME, "prompt": "Once upon", "max_tokens": 4, "temperature": 0}

    def one(i: int) -> str:
        kind = i % 4
        if kind == 0:
            reply = httpx.post(url + "/v1/completions", json=body, timeout=30)
            assert reply.status_code == 200 and reply.json()["choices"][0]["text"] == expected
        elif kind == 1:
            path = "/v1/chat/completions" if b"messages" in BAD_BODIES[i % len(BAD_BODIES)] else "/v1/completions"
            reply = httpx.post(url + path, content=BAD_BODIES[i % len(BAD_BODIES)], timeout=30)
            assert 400 <= reply.status_code < 500 and set(reply.json()["error"]) >= {"message", "type"}
        elif kind == 2:  # abandoned mid-stream
            with httpx.stream("POST", url + "/v1/completions", timeout=30,
                              json={**body, "max_tokens": 100, "stream": True, "temperature": 1}) as stream:
                next(stream.iter_lines())
        else:  # a sampled request with extreme values, or one abandoned before its reply
            extreme = {**body, "temperature": 1e-320, "repetition_penalty": 1e-320}
            try:
                reply = httpx.post(url + "/v1/completions", json=extreme, timeout=0.05 if i % 8 == 3 else 30)
                assert reply.status_code == 200
            except httpx.TimeoutException:
                pass
        return "ok"

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(24)))  # warm up: thread pools, caches, allocator
        _wait_for(lambda: httpx.get(url + "/health").json()["running"] == 0)
        before = _rss_mb()
        started = time.monotonic()
        assert list(pool.map(one, range(200))) == ["ok"] * 200
    assert time.monotonic() - started < 60
    _wait_for(lambda: (lambda h: h["running"] == 0 and h["waiting"] == 0)(httpx.get(url + "/health").json()))
    _wait_for(lambda: engine._active == 0)
    assert _rss_mb() - before < 40, (before, _rss_mb())
    reply = httpx.post(url + "/v1/completions", json=body, timeout=30)
    assert reply.status_code == 200 and reply.json()["choices"][0]["text"] == expected


def test_logprobs_of_ruled_out_tokens_are_standard_json(plain, model, monkeypatch):
    forward = model.runtime.forward

    def masked(step, cache):
        logits = np.array(forward(step, cache))
        logits[:, 13:] = -np.inf  # the model rules out all but 10 tokens
        logits[:, :3] = -np.inf  # and the special ones, so that no reply ends at once (with no logprobs to show)
        return logits
    replace_forward(monkeypatch, model.runtime, masked)
    response = httpx.post(plain[0] + "/v1/completions", timeout=30,
                          json={"model": NAME, "prompt": "Once", "max_tokens": 2, "logprobs": 20, "temperature": 1})
    assert response.status_code == 200

    def refuse(constant):
        raise AssertionError(f"{constant} is not JSON")
    top = json.loads(response.text, parse_constant=refuse)["choices"][0]["logprobs"]["top_logprobs"][0]
    assert min(top.values()) == -9999.0 and max(top.values()) > -9999  # (tokens with equal text share a key)
