"""The chat page at `/` of `polylm serve`, driven in a real headless Chromium (playwright's sync API, Debian's
chromium binary: playwright downloads no browser) against a real server on 127.0.0.1: the API key asked for after
a 401, the model name, streamed replies equal to the model's own greedy chat, a second turn that carries the
whole conversation, "New chat", Stop (the server's row is freed), and errors shown in the page (an HTTP 400, an
error event mid-stream, a network failure).

The checkpoint is tiny helium with a character-level tokenizer, so every token the model makes is visible text.
The server's steps are slowed to `STEP_SECONDS`, so tokens arrive one by one on any machine.
"""

import itertools
import re
import shutil
import time
from types import SimpleNamespace

import httpx
import pytest
from playwright.sync_api import sync_playwright
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

import polylm
from polylm.testing.checkpoints import VOCAB
from test_server import NAME, TEMPLATE, running

KEY = "page-key"
STEP_SECONDS = 0.03
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SYSTEM = "You answer in rhymes."
FIRST, SECOND = "Hello there", "Tell me more"
IDLE = "() => document.getElementById('stop').disabled && !document.getElementById('send').disabled"


def visible_tokenizer() -> str:
    """A character-level tokenizer over `VOCAB` ids whose every non-special token decodes to visible text:
    printable ASCII and newline, then syllables."""
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    pieces = [chr(c) for c in range(32, 127)] + ["\n"] + [s + end for end in ("", " ", "n") for s in syllables]
    vocab = SPECIALS + (pieces + [". ", ", ", "! ", "? ", "the ", "and ", "is ", "of ", "at ", "in "])
    tokenizer = Tokenizer(models.WordLevel({t: i for i, t in enumerate(vocab[:VOCAB])}, unk_token="<unk>"))
    tokenizer.add_special_tokens(SPECIALS)
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), "isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    assert tokenizer.get_vocab_size() == VOCAB
    return tokenizer.to_str()


@pytest.fixture(scope="module")
def checkpoint(make_ckpt, tmp_path_factory):
    directory = tmp_path_factory.mktemp("page") / "helium"
    shutil.copytree(make_ckpt("helium"), directory)
    (directory / "chat_template.jinja").write_text(TEMPLATE)
    (directory / "tokenizer.json").write_text(visible_tokenizer())
    return directory


@pytest.fixture(scope="module")
def reference(checkpoint):
    """The same checkpoint, loaded apart from the server's, for the replies the page must show."""
    return polylm.load(checkpoint, backend="torch")


@pytest.fixture(scope="module")
def server(checkpoint):
    """The server (API key required) with slowed steps; `break_step_after(n)` makes the n-th next step raise."""
    with running(polylm.load(checkpoint, backend="torch"), api_key=KEY) as (url, engine):
        step, countdown = engine.scheduler.step, []

        def slow_step():
            time.sleep(STEP_SECONDS)
            if countdown:
                countdown[0] -= 1
                if countdown[0] == 0:
                    countdown.clear()
                    raise RuntimeError("the test broke this step")
            return step()
        engine.scheduler.step = slow_step
        yield SimpleNamespace(url=url, engine=engine, break_step_after=lambda n: countdown.append(n))


@pytest.fixture(scope="module")
def browser():
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("the chat page test needs Chromium: apt-get install -y --no-install-recommends chromium "
                    "(Debian/Ubuntu; playwright drives it and downloads no browser)")
    with sync_playwright() as playwright:
        # playwright gives every launch a fresh temporary user-data-dir
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


def open_page(browser, url, *, key: str | None = KEY):
    """A fresh tab (its own sessionStorage) on the chat page, holding `key` as if typed earlier; its console's
    Content-Security-Policy complaints are collected in `page.csp`."""
    context = browser.new_context()
    if key is not None:
        context.add_init_script(f"sessionStorage.setItem('polylm-api-key', {key!r})")
    page = context.new_page()
    page.csp = []
    page.on("console", lambda message: "Content Security Policy" in message.text and page.csp.append(message.text))
    page.set_default_timeout(20_000)
    page.goto(url + "/")
    return page


@pytest.fixture
def page(browser, server):
    page = open_page(browser, server.url)
    page.wait_for_function(f"() => document.getElementById('model').textContent === {NAME!r}")
    yield page
    assert page.csp == []
    page.context.close()


def settings(page, *, temperature="0", max_tokens="", system=SYSTEM) -> None:
    page.fill("#temperature", temperature)
    page.fill("#max-tokens", max_tokens)
    page.fill("#system", system)


def watch_reply(page) -> None:
    """Record the last reply's text at every DOM update of the conversation, in `window.seen`."""
    page.evaluate("""() => {
        window.seen = [];
        new MutationObserver(() => {
            const reply = document.querySelector('#messages .assistant:last-child');
            if (reply) window.seen.push(reply.textContent);
        }).observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});
    }""")


def send(page, text: str) -> None:
    page.fill("#input", text)
    page.click("#send")
    page.wait_for_function(IDLE)


def texts(page, role: str) -> list[str]:
    return page.eval_on_selector_all(f"#messages .{role}", "nodes => nodes.map(n => n.textContent)")


def error(page) -> str | None:
    return page.evaluate("() => { const e = document.getElementById('error'); return e.hidden ? null : e.textContent; }")


def idle_server(server) -> None:
    deadline = time.monotonic() + 5
    while (health := httpx.get(server.url + "/health").json())["running"] or health["waiting"]:
        assert time.monotonic() < deadline, f"the server still has requests: {health}"
        time.sleep(0.02)


def test_page_is_public_and_the_api_is_not(server):
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
    assert "default-src 'none'" in page.headers["content-security-policy"] and "<title>polylm chat" in page.text
    assert not re.search(r"\b(src|href)=", page.text)  # nothing is fetched from elsewhere
    assert httpx.get(server.url + "/v1/models").status_code == 401
    assert httpx.post(server.url + "/").json()["error"]["message"].startswith("POST /:")


def test_the_key_is_asked_for_after_a_401(browser, server):
    page = open_page(browser, server.url, key=None)
    page.wait_for_function("() => !document.getElementById('error').hidden")
    assert "missing or wrong API key" in error(page)
    assert page.is_visible("#key") and page.text_content("#model") == "…"
    page.fill("#key", KEY)
    page.locator("#key").blur()  # "change": the page keeps the key for this tab and asks again
    page.wait_for_function(f"() => document.getElementById('model').textContent === {NAME!r}")
    assert error(page) is None and page.evaluate("sessionStorage.getItem('polylm-api-key')") == KEY
    assert page.csp == []
    page.context.close()


def test_streamed_turns_carry_the_conversation(page, reference):
    settings(page, max_tokens="24")
    watch_reply(page)
    send(page, FIRST)
    conversation = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": FIRST}]
    first = reference.chat(conversation, max_new_tokens=24)
    assert texts(page, "user") == [FIRST] and texts(page, "assistant") == [first] and len(first) > 10
    seen = [text for text in page.evaluate("window.seen") if text]
    assert len(set(seen)) >= 3 and seen[-1] == first  # it grew over several updates before it finished
    assert all(later.startswith(earlier) for earlier, later in itertools.pairwise(seen))

    page.fill("#input", SECOND)
    page.press("#input", "Enter")  # Enter sends too
    page.wait_for_function("() => document.querySelectorAll('#messages .assistant').length === 2")
    page.wait_for_function(IDLE)
    conversation += [{"role": "assistant", "content": first}, {"role": "user", "content": SECOND}]
    second = reference.chat(conversation, max_new_tokens=24)
    assert texts(page, "assistant") == [first, second]
    assert second != reference.chat(conversation[1:], max_new_tokens=24)  # the system prompt mattered
    assert second != reference.chat(conversation[:1] + conversation[3:], max_new_tokens=24)  # and the first turn

    page.click("#new-chat")
    assert texts(page, "assistant") == []
    send(page, SECOND)
    assert texts(page, "assistant") == [reference.chat(conversation[:1] + conversation[3:], max_new_tokens=24)]
    assert error(page) is None


def test_stop_ends_the_reply_and_frees_the_row(page, server, reference):
    settings(page, max_tokens="200")
    generated = server.engine.snapshot["generated_tokens"]
    page.fill("#input", FIRST)
    page.click("#send")
    page.wait_for_function("() => document.querySelector('#messages .assistant').textContent.length > 3")
    page.click("#stop")
    page.wait_for_function(IDLE)
    stopped = texts(page, "assistant")[0]
    time.sleep(20 * STEP_SECONDS)
    assert texts(page, "assistant") == [stopped]  # it grows no more
    full = reference.chat([{"role": "system", "content": SYSTEM}, {"role": "user", "content": FIRST}],
                          max_new_tokens=200)
    assert full.startswith(stopped) and len(stopped) < len(full) and error(page) is None
    assert page.get_attribute("#messages .assistant", "class") == "message assistant cut"
    idle_server(server)  # the server cancelled the request when the page let go of it
    assert server.engine.snapshot["generated_tokens"] - generated < 100

    settings(page, max_tokens="5")  # the page takes input again, and the stopped turn stays in the chat
    send(page, SECOND)
    assert len(texts(page, "assistant")) == 2 and error(page) is None


def test_errors_are_shown_in_the_page(page, server):
    settings(page, temperature="3")  # out of range: the server's 400 message, and the turn is taken back
    send(page, FIRST)
    assert error(page) == "'temperature' must be between 0 and 2, got 3"
    assert texts(page, "user") == [] and page.input_value("#input") == FIRST

    settings(page, max_tokens="100")  # an error event mid-stream: shown, and what came stays
    server.break_step_after(8)
    send(page, FIRST)
    assert error(page) == "generation failed (RuntimeError): the test broke this step"
    assert texts(page, "assistant")[0] != "" and page.input_value("#input") == ""
    idle_server(server)

    page.route("**/v1/chat/completions", lambda route: route.abort("connectionrefused"))  # the network fails
    send(page, SECOND)
    assert error(page).startswith("cannot reach the server: ") and len(texts(page, "assistant")) == 1
    page.unroute("**/v1/chat/completions")
    settings(page, max_tokens="3")
    send(page, SECOND)  # and it recovers
    assert error(page) is None and len(texts(page, "assistant")) == 2
