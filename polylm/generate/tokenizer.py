"""The checkpoint's tokenizer (tokenizer.json through the tokenizers library) and its special tokens."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from ..checkpoint.files import MAX_TOKENIZER_BYTES, read_json, read_text
from ..config import ConfigView
from ..errors import InputError, TokenizerError

#: The longest text encoded: about a million tokens, more than any supported model's context, and a few seconds
#: of the tokenizer's time (far longer texts make the tokenizers library run for minutes or abort the process).
MAX_TEXT_CHARS = 4_000_000
#: Texts longer than this (in characters) are encoded without holding Python's GIL.
_LONG_TEXT = 65536


def read_settings(directory: Path) -> dict[str, Any]:
    """tokenizer_config.json as an object (empty when the file is absent)."""
    path = directory / "tokenizer_config.json"
    settings = read_json(path, error=TokenizerError) if path.exists() else {}
    if not isinstance(settings, dict):
        raise TokenizerError(f"{path}: expected a JSON object, found {type(settings).__name__}")
    return settings


class Tokenizer:
    """Encodes and decodes text; knows bos / eos / pad ids from the checkpoint's JSON files."""

    def __init__(self, directory: Path, config: ConfigView) -> None:
        from tokenizers import Tokenizer as _Fast

        path = directory / "tokenizer.json"
        text = read_text(path, MAX_TOKENIZER_BYTES, TokenizerError, missing=" (polylm reads tokenizers in the "
                         "tokenizers library's JSON format only)")
        try:
            self._fast = _Fast.from_str(text)
        except Exception as exc:  # noqa: BLE001 - the tokenizers library raises bare Exceptions
            raise TokenizerError(f"{path}: cannot load tokenizer ({str(exc).splitlines()[0]})") from None
        self.settings = read_settings(directory)
        generation_path = directory / "generation_config.json"
        generation = read_json(generation_path) if generation_path.exists() else {}
        sources = [(generation, generation_path), (config.data, config.path)]
        self.bos_id = self._special("bos", sources)
        eos = self._special("eos", sources, many=True)
        self.eos_ids: tuple[int, ...] = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        self.pad_id = self._special("pad", sources)
        self.vocab_size = self._fast.get_vocab_size(with_added_tokens=True)

    def _special(self, name: str, sources: list[tuple[Any, Path]], many: bool = False) -> Any:
        """An id from generation_config.json, config.json, then tokenizer_config.json's token string."""
        for data, path in sources:
            value = data.get(f"{name}_token_id") if isinstance(data, dict) else None
            if value is None:
                continue
            if isinstance(value, int) and not isinstance(value, bool):
                return [value] if many else value
            if many and isinstance(value, list) and all(isinstance(v, int) for v in value):
                return value
            raise TokenizerError(f"{path}: key '{name}_token_id' must be an integer"
                                 f"{' or a list of integers' if many else ''}, found {value!r}")
        token = self.settings.get(f"{name}_token")
        if isinstance(token, dict):
            token = token.get("content")
        if isinstance(token, str):
            return self._fast.token_to_id(token)
        return None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        text = checked_text(text, "prompt")
        if len(text) > _LONG_TEXT:  # encode_batch lets other threads (a server's event loop) run meanwhile
            return self._fast.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        return self._fast.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_pair(self, first: str, second: str | None):
        return self._fast.encode(checked_text(first, "text"), None if second is None else checked_text(second, "text"))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._fast.decode(list(ids), skip_special_tokens=skip_special_tokens)


def checked_text(text: Any, what: str) -> str:
    """`text` if it is a string the tokenizer can take: Unicode text (no unpaired surrogate) of at most
    `MAX_TEXT_CHARS` characters; `InputError` naming `what` otherwise."""
    if not isinstance(text, str):
        raise InputError(f"{what} must be a string, found {type(text).__name__}")
    if len(text) > MAX_TEXT_CHARS:
        raise InputError(f"{what} of {len(text):,} characters is longer than the {MAX_TEXT_CHARS:,} polylm encodes")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InputError(f"{what} is not valid Unicode text: an unpaired surrogate {text[exc.start]!r} at "
                         f"character {exc.start}") from None
    return text
