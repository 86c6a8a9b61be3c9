"""What the task heads' raw outputs mean to a person: labels for texts and tokens, answer spans.

Softmax scores and span selection follow transformers' pipelines (text-classification, token-classification
with no aggregation, question-answering with `max_answer_len` 15 and overlapping windows over long contexts).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np

from ..errors import InputError, TaskError
from ..ir import ModelIR
from .tokenizer import Tokenizer


class Model(Protocol):
    """What the pipelines use of a `polylm.model.Model` (which calls them)."""

    ir: ModelIR
    path: Path

    @property
    def task(self) -> str: ...

    def forward(self, input_ids: Any, attention_mask: Any = None) -> Any: ...

    def _encode_prompt(self, prompt: Any) -> list[int]: ...

    def _check_batch(self, input_ids: Any, attention_mask: Any) -> Any: ...

    def _need_tokenizer(self) -> Tokenizer: ...


@dataclass(frozen=True)
class Label:
    label: str
    score: float


@dataclass(frozen=True)
class TaggedToken:
    text: str
    label: str
    score: float
    start: int
    end: int


@dataclass(frozen=True)
class Answer:
    answer: str
    score: float
    start: int
    end: int


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _require_task(model: Model, task: str, call: str) -> None:
    if model.task != task:
        raise TaskError(f"{model.path} holds a {model.task} model; {call} needs a {task} checkpoint")


def _left_padded(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    longest = max(len(r) for r in rows)
    ids = np.full((len(rows), longest), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), longest), dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, longest - len(row):], mask[i, longest - len(row):] = row, 1
    return ids, mask


def classify(model: Model, texts: str | Sequence[str]) -> list[Label]:
    """The best label and its score for each text (sigmoid for a single-output head, softmax otherwise)."""
    _require_task(model, "sequence-classification", "classify")
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts:
        raise InputError("classify needs at least one text")
    rows = [model._encode_prompt(t) for t in texts]
    logits = model.forward(*_left_padded(rows, model._need_tokenizer().pad_id or 0))
    labels = model.ir.head.labels
    if logits.shape[-1] == 1:
        probs = 1 / (1 + np.exp(-logits[:, 0]))
        return [Label(labels[0], float(p)) for p in probs]
    probs = _softmax(logits)
    return [Label(labels[int(p.argmax())], float(p.max())) for p in probs]


def tag(model: Model, text: str) -> list[TaggedToken]:
    """A label per token of `text`, with the token's characters in `text` (special tokens left out)."""
    _require_task(model, "token-classification", "tag")
    if not isinstance(text, str) or not text:
        raise InputError("tag needs a non-empty text")
    encoding = model._need_tokenizer().encode_pair(text, None)
    model._check_batch([encoding.ids], None)
    probs = _softmax(model.forward([encoding.ids])[0])
    labels = model.ir.head.labels
    tokens = []
    for i, (start, end) in enumerate(encoding.offsets):
        if encoding.special_tokens_mask[i]:
            continue
        best = int(probs[i].argmax())
        tokens.append(TaggedToken(text[start:end], labels[best], float(probs[i, best]), start, end))
    return tokens


def answer(model: Model, question: str, context: str, *, max_answer_len: int = 15,
           window: int | None = None, stride: int = 64) -> Answer:
    """The best answer span of `context` for `question`.

    A span starts at or before its end, lies inside the context and is at most `max_answer_len` tokens; its
    score is p(start) × p(end) with both softmaxes over the context tokens. Contexts longer than the window
    (the model's context by default) are read in overlapping windows, `stride` tokens of overlap.
    """
    _require_task(model, "question-answering", "answer")
    for name, value in (("question", question), ("context", context)):
        if not isinstance(value, str) or not value.strip():
            raise InputError(f"answer needs a non-empty {name}")
    tokenizer = model._need_tokenizer()
    window = window or model.ir.context_length
    question_len = len(tokenizer.encode_pair(question, "").ids)
    room = window - question_len
    if room < 1:
        raise InputError(f"the question takes {question_len} tokens, leaving no room for the context in a "
                         f"window of {window} tokens")
    context_enc = tokenizer.encode_pair(context, None)
    spans = [(s, e) for (s, e), special in zip(context_enc.offsets, context_enc.special_tokens_mask) if not special]
    best = Answer("", -1.0, 0, 0)
    start_token = 0
    while True:
        chunk = spans[start_token:start_token + room]
        best = max(best, _best_in_window(model, tokenizer, question, context, chunk, max_answer_len),
                   key=lambda a: a.score)
        if start_token + room >= len(spans):
            return best
        start_token += max(1, room - stride)


def _best_in_window(model, tokenizer, question, context, chunk, max_answer_len) -> Answer:
    piece_start, piece_end = chunk[0][0], chunk[-1][1]
    encoding = tokenizer.encode_pair(question, context[piece_start:piece_end])
    context_slots = [i for i, seq in enumerate(encoding.sequence_ids) if seq == 1]
    out = model.forward([encoding.ids])
    start_p = _softmax(out["start_logits"][0, context_slots])
    end_p = _softmax(out["end_logits"][0, context_slots])
    scores = np.triu(np.outer(start_p, end_p))
    scores = np.tril(scores, max_answer_len - 1)
    s, e = np.unravel_index(int(scores.argmax()), scores.shape)
    char_start = piece_start + encoding.offsets[context_slots[s]][0]
    char_end = piece_start + encoding.offsets[context_slots[e]][1]
    while char_start < char_end and context[char_start].isspace():
        char_start += 1
    return Answer(context[char_start:char_end], float(scores[s, e]), char_start, char_end)
