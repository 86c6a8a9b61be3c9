"""`Model`: a loaded checkpoint on a backend, with forward passes and generation."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from .backend import Runtime, Step
from .errors import InputError, TaskError, TokenizerError
from .generate import tasks
from .generate.chat import find_template, given_template, render
from .generate.sampling import Sampling
from .generate.scheduler import STOP, Scheduler
from .generate.stream import TextStream
from .generate.tokenizer import Tokenizer
from .ir import ModelIR
from .numerics.logits import finish_head


class Model:
    """A model ready to run. `forward` gives raw head outputs; `generate` produces text or token ids."""

    def __init__(self, ir: ModelIR, runtime: Runtime, tokenizer: Tokenizer | None, *, backend: str,
                 path: Path, notes: tuple[str, ...] = ()) -> None:
        self.ir = ir
        self.runtime = runtime
        self.tokenizer = tokenizer
        self.backend = backend
        self.path = path
        self.notes = notes  # what the family said about running this checkpoint (`polylm.family.Mapped`)

    @property
    def task(self) -> str:
        return self.ir.head.task

    @property
    def dtype(self) -> str:
        return self.runtime.dtype

    def __repr__(self) -> str:
        return (f"Model({self.ir.family}, task={self.task}, backend={self.backend}, dtype={self.dtype}, "
                f"path={str(self.path)!r})")

    # -- forward ---------------------------------------------------------------------------------------------

    def forward(self, input_ids: Any, attention_mask: Any = None) -> np.ndarray | dict[str, np.ndarray]:
        """Head outputs for a batch [batch, seq] of token ids, as float32 numpy.

        causal-lm → [batch, seq, vocab]; token-classification → [batch, seq, labels];
        sequence-classification → [batch, labels] (from each row's last non-padding token);
        question-answering → {"start_logits", "end_logits"}, each [batch, seq].
        """
        ids, mask = self._check_batch(input_ids, attention_mask)
        positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
        gather = None
        if self.task == "sequence-classification":
            if not mask.any(axis=1).all():
                raise InputError("attention_mask: every row needs at least one real token to classify")
            gather = mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)
        out = finish_head(self.ir.head, self.runtime.forward(Step(ids, positions, mask, gather=gather)))
        if self.task == "question-answering":
            return {"start_logits": np.ascontiguousarray(out[..., 0]), "end_logits": np.ascontiguousarray(out[..., 1])}
        return out

    def _check_batch(self, input_ids: Any, attention_mask: Any) -> tuple[np.ndarray, np.ndarray]:
        try:
            ids = np.asarray(input_ids)
        except ValueError:
            raise InputError("input_ids must be a rectangular [batch, seq] array of token ids") from None
        if ids.ndim == 1:
            ids = ids[None, :]
        if ids.ndim != 2 or ids.shape[1] == 0 or ids.shape[0] == 0:
            raise InputError(f"input_ids must have shape [batch, seq] with seq ≥ 1, got {list(ids.shape)}")
        if not np.issubdtype(ids.dtype, np.integer):
            raise InputError(f"input_ids must be integers, got {ids.dtype}")
        vocab = self.ir.embedding.vocab_size
        if ids.min() < 0 or ids.max() >= vocab:
            bad = int(ids.max()) if ids.max() >= vocab else int(ids.min())
            raise InputError(f"token id {bad} is outside the vocabulary [0, {vocab})")
        if ids.shape[1] > self.ir.context_length:
            raise InputError(f"sequence of {ids.shape[1]} tokens exceeds the model's context of "
                             f"{self.ir.context_length} tokens")
        if attention_mask is None:
            mask = np.ones(ids.shape, dtype=bool)
        else:
            mask = np.asarray(attention_mask)
            if mask.ndim == 1:
                mask = mask[None, :]
            if mask.shape != ids.shape:
                raise InputError(f"attention_mask shape {list(mask.shape)} differs from input_ids "
                                 f"shape {list(ids.shape)}")
            if not (np.issubdtype(mask.dtype, np.integer) or mask.dtype == bool) or not np.isin(mask, (0, 1)).all():
                raise InputError("attention_mask must hold only 0 and 1")
            mask = mask.astype(bool)
        return ids.astype(np.int64), mask

    # -- task pipelines (see polylm.generate.tasks) ------------------------------------------------------------------

    def classify(self, texts: str | Sequence[str]) -> list:
        """The best label and its score for each text (sequence-classification checkpoints)."""
        if not isinstance(texts, (str, list, tuple)):
            raise InputError(f"classify takes a string or a list of strings, found {type(texts).__name__}")
        return tasks.classify(self, texts)

    def tag(self, text: str) -> list:
        """(token text, label, score, start, end) per token of `text` (token-classification checkpoints)."""
        return tasks.tag(self, text)

    def answer(self, question: str, context: str, **options: Any):
        """The best answer span of `context` for `question` (question-answering checkpoints)."""
        return tasks.answer(self, question, context, **options)

    # -- chat ------------------------------------------------------------------------------------------------

    def chat_prompt(self, messages: Sequence[dict], *, template: str | os.PathLike | None = None) -> list[int]:
        """Token ids of `messages` rendered through the checkpoint's chat template, or `template` (the
        template's text, or a path to its file)."""
        tokenizer = self._need_tokenizer()
        chosen = find_template(self.path, tokenizer.settings) if template is None else given_template(template)
        if chosen is None:
            raise TokenizerError(f"{self.path}: the checkpoint has no chat template (tokenizer_config.json "
                                 "'chat_template' or chat_template.jinja); pass one with --chat-template FILE")
        return tokenizer.encode(render(chosen, messages, tokenizer.settings), add_special_tokens=False)

    def chat(self, messages: Sequence[dict], *, template: str | os.PathLike | None = None, **sampling: Any) -> Any:
        """The assistant's reply to `messages` (a list of {"role", "content"}); `stream=True` yields pieces."""
        ids = self.chat_prompt(messages, template=template)
        stream = sampling.pop("stream", False)
        pieces = self._generate_text(ids, stream=True, text_output=True, **sampling)
        return pieces if stream else "".join(pieces)

    # -- generation ------------------------------------------------------------------------------------------

    def generate(self, prompt: str | Sequence[int] | Sequence[str] | Sequence[Sequence[int]], *,
                 max_new_tokens: int = 64, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, min_p: float | None = None, repetition_penalty: float = 1.0,
                 seed: int | None = None, stop: str | Sequence[str] | None = None, stream: bool = False) -> Any:
        """Continue a prompt.

        A string gives the new text; a list of token ids gives the new ids; a list of either runs them as one
        batch and gives one result per prompt, each what it would be alone (every row is seeded with `seed`).
        `stream=True` (single prompt) yields pieces as they are made. Generation stops at eos, at a stop string
        (not included), after `max_new_tokens`, or at the end of the model's context. A prompt that already
        fills the context (with `max_new_tokens` > 0) raises `InputError` instead of returning nothing.
        Sampling settings mean what they mean in transformers.
        """
        return self._generate_text(prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                   top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty, seed=seed,
                                   stop=stop, stream=stream)

    def _generate_text(self, prompt: Any, *, max_new_tokens: int = 64, temperature: float = 0.0,
                       top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
                       repetition_penalty: float = 1.0, seed: int | None = None,
                       stop: str | Sequence[str] | None = None, stream: bool = False,
                       text_output: bool = False) -> Any:
        """`generate`, with `text_output` giving text even for token-id prompts."""
        sampling = Sampling(max_new_tokens, temperature, top_k, top_p, seed, min_p, repetition_penalty)
        stops = _stop_strings(stop)
        if not isinstance(stream, bool):
            raise InputError(f"stream must be True or False, got {stream!r}")
        if self.task != "causal-lm":
            raise TaskError(f"{self.path} holds a {self.task} model; generation needs a causal-lm checkpoint")
        batch = isinstance(prompt, (list, tuple)) and len(prompt) > 0 and not _is_token(prompt[0])
        prompts = list(prompt) if batch else [prompt]
        if batch and stream:
            raise InputError("stream=True takes a single prompt")
        as_text = [text_output or isinstance(p, str) for p in prompts]
        encoded = [self._encode_prompt(p) for p in prompts]
        full = next((ids for ids in encoded if len(ids) >= self.ir.context_length), None)
        if full is not None and max_new_tokens > 0:
            raise InputError(f"prompt of {len(full)} tokens fills the model's context of {self.ir.context_length} "
                             "tokens, leaving no room for new tokens")
        streams = [TextStream(self._need_tokenizer(), stops) if t else None for t in as_text]
        events = self._decode(encoded, sampling, streams)
        if stream:
            return (piece for _, piece in events)
        results: list[Any] = ["" if t else [] for t in as_text]
        for row, piece in events:
            results[row] += piece
        return results if batch else results[0]

    def _decode(self, prompts: list[list[int]], sampling: Sampling,
                streams: list[TextStream | None]) -> Iterator[tuple[int, Any]]:
        """(prompt index, new ids or text piece) as the batch runs; a stop string ends its row at once."""
        eos = self.tokenizer.eos_ids if self.tokenizer else ()
        scheduler = Scheduler(self.runtime, max_batch=len(prompts), context_length=self.ir.context_length,
                              eos_ids=eos)
        rows = {scheduler.submit(prompt, sampling).id: row for row, prompt in enumerate(prompts)}
        while scheduler.busy:
            for out in scheduler.step():
                if out.error is not None:
                    raise out.error
                if out.choice is None:
                    continue
                row, text = rows[out.request.id], streams[rows[out.request.id]]
                if text is None:
                    yield row, [out.choice.token]
                    continue
                piece = text.push(out.choice.token)
                if piece:
                    yield row, piece
                if text.stopped:
                    scheduler.cancel(out.request, STOP)
        for row, text in enumerate(streams):
            if text is not None:
                rest = text.finish()
                if rest:
                    yield row, rest

    def _encode_prompt(self, prompt: Any) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise InputError("prompt is empty")
            ids = self._need_tokenizer().encode(prompt)
        elif isinstance(prompt, (list, tuple, np.ndarray)) and all(_is_token(t) for t in prompt):
            ids = [int(t) for t in prompt]
        else:
            raise InputError(f"a prompt must be a string or a list of integer token ids, found {_describe(prompt)}")
        if not ids:
            raise InputError("prompt is empty (it encodes to no tokens)")
        self._check_batch([ids], None)
        return ids

    def _need_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise TokenizerError(f"{self.path}: no tokenizer.json, so text prompts cannot be encoded (from Python, "
                                 "`generate` takes a list of token ids instead)")
        return self.tokenizer


def _is_token(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _describe(value: Any) -> str:
    """What a bad prompt is, for errors: its type, or the first item of a list that is not a token id."""
    if isinstance(value, (list, tuple)):
        bad = next((v for v in value if not _is_token(v)), None)
        return f"a list holding {type(bad).__name__} {bad!r:.40}"
    return f"{type(value).__name__} {value!r:.40}"


def _stop_strings(stop: Any) -> list[str]:
    """`stop` as a list of strings: None, one string, or a list or tuple of strings."""
    stops = [stop] if isinstance(stop, str) else stop if isinstance(stop, (list, tuple)) else None
    if stop is None:
        return []
    if stops is None or not all(isinstance(s, str) for s in stops):
        raise InputError(f"stop must be a string or a list of strings, got {stop!r:.80}")
    return list(stops)
