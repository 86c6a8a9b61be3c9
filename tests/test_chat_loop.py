"""`polylm chat` on a terminal: Ctrl-C stops a reply and keeps the conversation; Ctrl-C or Ctrl-D at the prompt
ends the chat with status 0."""

import io
import sys

import pytest
from test_first_run import GEMMA_STYLE  # roles must alternate: a dropped or doubled turn fails to render

import polylm
from polylm.cli import main
from polylm.generate.stream import TextStream
from polylm.model import Model


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def chat(make_ckpt, tmp_path, monkeypatch):
    """chat(inputs, interrupt_at) runs `polylm chat` with `inputs` typed at the prompt (an exception is raised
    there instead), the first reply stopped by Ctrl-C at its `interrupt_at`-th token; returns the exit status and
    the messages each reply was asked for."""
    template = tmp_path / "template.jinja"
    template.write_text(GEMMA_STYLE)
    directory = make_ckpt("helium")  # its tiny random replies are more than newlines
    asked: list[list[dict]] = []
    original_chat, original_push = Model.chat, TextStream.push

    def recording_chat(self, messages, **kwargs):
        asked.append([dict(m) for m in messages])
        return original_chat(self, messages, **kwargs)

    def run(inputs, interrupt_at=None):
        typed = iter(inputs)
        pushed = []

        def fake_input(prompt):
            sys.stdout.write(prompt)
            item = next(typed)
            if isinstance(item, BaseException):
                raise item
            return item

        def push(self, token_id):  # runs inside the generation, where a real Ctrl-C mostly lands
            pushed.append(token_id)
            if len(asked) == 1 and len(pushed) == interrupt_at:
                raise KeyboardInterrupt
            return original_push(self, token_id)

        monkeypatch.setattr("builtins.input", fake_input)
        monkeypatch.setattr(sys, "stdin", Terminal())
        monkeypatch.setattr(Model, "chat", recording_chat)
        monkeypatch.setattr(TextStream, "push", push)
        status = main(["chat", "--model", str(directory), "--backend", "torch", "--chat-template", str(template),
                       "--max-new-tokens", "8"])
        return status, asked

    run.reference = lambda messages: polylm.load(directory, backend="torch").chat(
        messages, template=GEMMA_STYLE, max_new_tokens=8)
    return run


def test_ctrl_c_mid_reply_keeps_the_part_shown_and_the_conversation(chat, capsys):
    status, asked = chat(["Hello", "Tell me more", EOFError()], interrupt_at=4)
    out = capsys.readouterr().out
    assert status == 0
    hello = {"role": "user", "content": "Hello"}
    assert [len(a) for a in asked] == [1, 3] and asked[1][0] == hello and asked[1][2]["content"] == "Tell me more"
    partial = asked[1][1]["content"]
    full = chat.reference([hello])
    assert asked[1][1]["role"] == "assistant" and partial and full.startswith(partial) and len(partial) < len(full)
    turns = out.split("you> ")
    assert turns[1] == f"assistant> {partial}\n"  # what was shown is what the conversation keeps
    assert turns[2] == f"assistant> {chat.reference(asked[1])}\n"  # the stopped generation left nothing behind


def test_ctrl_c_before_the_first_piece_takes_the_question_back(chat, capsys):
    status, asked = chat(["Hello", "Again", EOFError()], interrupt_at=1)
    assert status == 0
    assert asked == [[{"role": "user", "content": "Hello"}], [{"role": "user", "content": "Again"}]]


@pytest.mark.parametrize("key", [EOFError(), KeyboardInterrupt()], ids=["ctrl-d", "ctrl-c"])
def test_ctrl_c_or_ctrl_d_at_the_prompt_ends_the_chat(chat, capsys, key):
    status, asked = chat(["Hello", key])
    captured = capsys.readouterr()
    assert status == 0 and len(asked) == 1
    assert captured.out.endswith("you> \n") and "interrupted" not in captured.err
