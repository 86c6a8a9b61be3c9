"""Chat templates: the checkpoint's Jinja template found, read and rendered as transformers'
`apply_chat_template` does, in the bounded sandbox of `polylm.generate.sandbox`.

Whatever goes wrong in a template becomes a `TemplateError` naming where the template came from; a template
that refuses the messages on purpose (`raise_exception`) gives an `InputError`.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple, Sequence

from ..checkpoint.files import MAX_TEMPLATE_BYTES, read_json, read_text
from ..errors import InputError, TemplateError

_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")
#: Real templates are a few thousand characters; jinja takes about a second per 30,000 to compile.
MAX_TEMPLATE_CHARS = 64 * 2**10


class ChatTemplate(NamedTuple):
    """A chat template's Jinja source and where it came from (a file, or a key of one), for errors."""

    source: str
    origin: str


def find_template(directory: Path, settings: dict[str, Any]) -> ChatTemplate | None:
    """The default chat template of a checkpoint: chat_template.jinja, chat_template.json, or
    tokenizer_config.json's `chat_template` (a string, or a list of named templates)."""
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.exists():
        return ChatTemplate(read_text(jinja_file, MAX_TEMPLATE_BYTES, TemplateError), str(jinja_file))
    json_file = directory / "chat_template.json"
    if json_file.exists():
        data, origin = read_json(json_file, error=TemplateError), f"{json_file}: key 'chat_template'"
        if not isinstance(data, dict):
            raise TemplateError(f"{json_file}: expected a JSON object holding 'chat_template', found "
                                f"{type(data).__name__}")
        template = data.get("chat_template")
    else:
        template, origin = settings.get("chat_template"), f"{directory / 'tokenizer_config.json'}: key 'chat_template'"
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise TemplateError(f"{origin}: must be a string or a list of named templates, found "
                            f"{type(template).__name__}")
    return None if template is None else ChatTemplate(template, origin)


def given_template(template: Any) -> ChatTemplate:
    """A template the caller passed: its source text, or a path (`os.PathLike`) to a template file."""
    if isinstance(template, os.PathLike):
        path = Path(template)
        return ChatTemplate(read_text(path, MAX_TEMPLATE_BYTES, TemplateError), str(path))
    if not isinstance(template, str):
        raise InputError(f"template must be the template's text or a path to its file, found "
                         f"{type(template).__name__}")
    return ChatTemplate(template, "the chat template passed in")


@lru_cache(maxsize=8)
def _compile(template: ChatTemplate):
    from .sandbox import compile_template

    if len(template.source) > MAX_TEMPLATE_CHARS:
        raise TemplateError(f"{template.origin}: template of {len(template.source):,} characters is longer than "
                            f"the {MAX_TEMPLATE_CHARS:,} polylm reads")
    try:
        return compile_template(template.source)
    except Exception as exc:  # noqa: BLE001 - whatever the template does is the template's error
        raise _template_error(template, "does not compile", exc) from None


def _template_error(template: ChatTemplate, doing: str, exc: Exception) -> TemplateError:
    from jinja2.exceptions import TemplateError as JinjaError

    from .sandbox import Limit

    text = " ".join(str(exc).split()) or type(exc).__name__
    if not isinstance(exc, (Limit, JinjaError)):
        text = f"{type(exc).__name__}: {text}"
    return TemplateError(f"{template.origin}: chat template {doing} ({text[:300]})")


def render(template: ChatTemplate | str, messages: Sequence[dict[str, Any]], settings: dict[str, Any], *,
           add_generation_prompt: bool = True, **extra: Any) -> str:
    """The prompt text for `messages`; special tokens come from tokenizer_config.json as transformers passes
    them. `template` is a `ChatTemplate` or the template's text."""
    from .sandbox import Limit, Refusal, render_bounded

    if isinstance(template, str):
        template = given_template(template)
    if not messages or not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
        raise InputError("messages must be a non-empty list of {'role': ..., 'content': ...} objects")
    specials = {}
    for key in _SPECIAL_TOKEN_KEYS:
        value = settings.get(key)
        specials[key] = value.get("content") if isinstance(value, dict) else value
    compiled = _compile(template)
    context = dict(messages=list(messages), add_generation_prompt=add_generation_prompt, **specials, **extra)
    try:
        return render_bounded(compiled, context)
    except Limit as exc:
        raise _template_error(template, "passed a bound", exc) from None
    except Refusal as exc:
        raise InputError(f"{template.origin}: chat template refused the messages: "
                         f"{' '.join(str(exc).split())[:300]}") from None
    except Exception as exc:  # noqa: BLE001 - RecursionError, MemoryError, ZeroDivisionError... are the template's
        raise _template_error(template, "failed", exc) from None
