"""Token ids to text pieces as they are made: never a split UTF-8 character, never a stop string."""

from __future__ import annotations

from typing import Sequence


class TextStream:
    """Turns token ids into text pieces that never split a UTF-8 character and never show a stop string."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.emitted = 0
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add a token; return the text that is now final."""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        cut = self._stop_at(text)
        if cut is not None:
            self.stopped = True
            return self._emit(text[:cut])
        complete = text.rstrip("\ufffd")
        hold = max((_overlap(complete, s) for s in self.stop), default=0)
        return self._emit(complete[:len(complete) - hold])

    def finish(self) -> str:
        """The rest of the text once generation ended (an unfinished character is dropped)."""
        if self.stopped:
            return ""
        return self._emit(self.tokenizer.decode(self.ids).rstrip("\ufffd"))

    def _stop_at(self, text: str) -> int | None:
        hits = [i for i in (text.find(s, max(0, self.emitted - len(s))) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _emit(self, upto: str) -> str:
        piece = upto[self.emitted:]
        self.emitted = max(self.emitted, len(upto))
        return piece


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `stop`."""
    for size in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:size]):
            return size
    return 0


def token_offsets(tokenizer, ids: Sequence[int]) -> list[int]:
    """Where each token's text starts in `tokenizer.decode(ids)`, decoding a few tokens at a time (each token in
    the context of the one before, so a decoder's word boundaries hold); a token that ends inside a character
    starts where that character does, as does the token that completes it."""
    offsets, length = [], 0
    context = done = 0  # ids[context:done]: the decoded tokens the next one is read after
    for index in range(len(ids)):
        offsets.append(length)
        text = tokenizer.decode(ids[context:index + 1])
        if text.endswith("\ufffd"):  # a character split across tokens: wait for its end
            continue
        length += max(len(text) - len(tokenizer.decode(ids[context:done])), 0)
        context, done = done, index + 1
    return offsets
