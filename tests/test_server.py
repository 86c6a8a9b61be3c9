"""`polylm serve` driven with the real `openai` client: chat and completions, streamed and not, stop strings,
logprobs, errors, concurrency (each client gets what it gets alone), disconnects and a full queue.

Servers run in-process on 127.0.0.1 and a free port (the torch backend, tiny checkpoints); fixtures always stop them.
"""

import contextlib
import json
import os
import re
import shutil
import signal
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
from polylm.cli import main
from polylm.generate.sampling import log_softmax
from polylm.serve.app import bind, create_app

NAME = "tiny-helium"
KEY = "sekret"
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
    with running(model, api_key=KEY, max_batch=4, min_prefix=4) as (url, engine):
        yield url, engine


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
])
def test_cli_serve_user_errors_exit_2(checkpoint, capsys, args, message):
    assert main(["serve", "--model", str(checkpoint), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
