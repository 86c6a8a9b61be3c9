"""The checkpoint's tokenizer (tokenizer.json through the tokenizers library) and its special tokens."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from ..config import ConfigView, read_json
from ..errors import InputError, TokenizerError

#: Texts longer than this (in characters) are encoded without holding Python's GIL.
_LONG_TEXT = 65536


class Tokenizer:
    """Encodes and decodes text; knows bos / eos / pad ids from the checkpoint's JSON files."""

    def __init__(self, directory: Path, config: ConfigView) -> None:
        from tokenizers import Tokenizer as _Fast

        path = directory / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(f"{directory}: tokenizer.json not found (polylm reads tokenizers in the "
                                 "tokenizers library's JSON format only)")
        try:
            self._fast = _Fast.from_file(str(path))
        except Exception as exc:  # noqa: BLE001 - the tokenizers library raises bare Exceptions
            raise TokenizerError(f"{path}: cannot load tokenizer ({str(exc).splitlines()[0]})") from None
        settings_path = directory / "tokenizer_config.json"
        self.settings: dict[str, Any] = read_json(settings_path) if settings_path.is_file() else {}
        if not isinstance(self.settings, dict):
            raise TokenizerError(f"{settings_path}: expected a JSON object")
        generation_path = directory / "generation_config.json"
        generation = read_json(generation_path) if generation_path.is_file() else {}
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
        if not isinstance(text, str):
            raise InputError(f"prompt must be a string, found {type(text).__name__}")
        if len(text) > _LONG_TEXT:  # encode_batch lets other threads (a server's event loop) run meanwhile
            return self._fast.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        return self._fast.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_pair(self, first: str, second: str):
        return self._fast.encode(first, second)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._fast.decode(list(ids), skip_special_tokens=skip_special_tokens)
