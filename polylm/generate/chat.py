"""Chat templates: the checkpoint's Jinja template rendered as transformers' `apply_chat_template` does."""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

from ..config import read_json
from ..errors import InputError, TokenizerError

_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


def find_template(directory: Path, settings: dict[str, Any]) -> str | None:
    """The default chat template of a checkpoint: chat_template.jinja, chat_template.json, or
    tokenizer_config.json's `chat_template` (a string, or a list of named templates)."""
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    json_file = directory / "chat_template.json"
    template = read_json(json_file).get("chat_template") if json_file.is_file() else settings.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise TokenizerError(f"{directory}: chat_template must be a string or a list of named templates")
    return template


@lru_cache(maxsize=8)
def _compile(template: str):
    from jinja2.exceptions import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
               sort_keys: bool = False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except TemplateError as exc:
        raise TokenizerError(f"chat template does not compile: {exc}") from None


def render(template: str, messages: Sequence[dict[str, Any]], settings: dict[str, Any], *,
           add_generation_prompt: bool = True, **extra: Any) -> str:
    """The prompt text for `messages`; special tokens come from tokenizer_config.json as transformers passes them."""
    from jinja2.exceptions import TemplateError

    if not messages or not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
        raise InputError("messages must be a non-empty list of {'role': ..., 'content': ...} objects")
    specials = {}
    for key in _SPECIAL_TOKEN_KEYS:
        value = settings.get(key)
        specials[key] = value.get("content") if isinstance(value, dict) else value
    try:
        return _compile(template).render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                         **specials, **extra)
    except TemplateError as exc:
        raise InputError(f"chat template refused the messages: {exc}") from None
