"""A jinja2 sandbox for chat templates, bounded in size and time.

Bounds: every string or list a template builds and its whole output stay within `MAX_OUTPUT_CHARS` (checked
before a repetition, power or width is applied, and after each concatenation, call and filter); ranges hold
at most jinja's 100,000 items; rendering stops after `RENDER_SECONDS`, checked on every line of the
template's code, so no loop runs on. Passing a bound raises `Limit`, `raise_exception` raises `Refusal`;
anything else a template raises (jinja errors, RecursionError, ZeroDivisionError...) passes through.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from datetime import datetime
from typing import Any, Callable, Sequence

from jinja2 import Template
from jinja2.compiler import CodeGenerator
from jinja2.exceptions import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .tokenizer import MAX_TEXT_CHARS

MAX_OUTPUT_CHARS = MAX_TEXT_CHARS  # the rendered prompt is encoded next, so the tokenizer's limit holds here
MAX_INT_BITS = 4096
RENDER_SECONDS = 5.0
_TEMPLATE_FILE = "<template>"  # the code filename jinja gives templates made with from_string


class Limit(Exception):
    """A bound of the sandbox was passed; the message says which."""


class Refusal(TemplateError):
    """The template refused its input on purpose (its `raise_exception(message)`)."""


def _bounded(value: Any) -> Any:
    if isinstance(value, (str, list, tuple)) and len(value) > MAX_OUTPUT_CHARS:
        raise Limit(f"builds a value of {len(value):,} items, more than {MAX_OUTPUT_CHARS:,}")
    return value


def _check_arguments(args: Sequence[Any], kwargs: dict[str, Any]) -> None:
    """Refuse an integer argument (a width, a count) larger than any value a template may build."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, int) and abs(value) > MAX_OUTPUT_CHARS:
            raise Limit(f"passes {value:,} to a filter or method; at most {MAX_OUTPUT_CHARS:,} is allowed")


def _bounded_filter(func: Callable) -> Callable:
    first = 2 if getattr(func, "jinja_pass_arg", None) else 1  # the arguments after the context and the value

    @functools.wraps(func)  # keeps jinja's pass_context / pass_environment mark
    def bounded(*args: Any, **kwargs: Any) -> Any:
        _check_arguments(args[first:], kwargs)
        return _bounded(func(*args, **kwargs))
    return bounded


class _Generator(CodeGenerator):
    """Jinja's code generator, with each `~` concatenation checked like every other value built."""

    def visit_Concat(self, node, frame) -> None:
        self.write("environment.bounded(")
        super().visit_Concat(node, frame)
        self.write(")")


class _Environment(ImmutableSandboxedEnvironment):
    """The immutable sandbox with repetition, power, addition, concatenation and every call bounded in size."""

    code_generator_class = _Generator
    intercepted_binops = frozenset({"*", "**", "+"})
    bounded = staticmethod(_bounded)

    def call_binop(self, context, operator: str, left: Any, right: Any) -> Any:
        ints = isinstance(left, int) and isinstance(right, int)
        if operator == "*":
            count, item = (left, right) if isinstance(left, int) else (right, left)
            if isinstance(count, int) and isinstance(item, (str, list, tuple)) and \
                    count * len(item) > MAX_OUTPUT_CHARS:  # refused before the value is built
                raise Limit(f"repeats {len(item):,} items {count:,} times, more than {MAX_OUTPUT_CHARS:,}")
            if ints and left.bit_length() + right.bit_length() > MAX_INT_BITS:
                raise Limit(f"multiplies integers of more than {MAX_INT_BITS} bits")
        if operator == "**" and ints and abs(left) > 1 and right * left.bit_length() > MAX_INT_BITS:
            raise Limit(f"raises {left} to the power {right}, an integer of more than {MAX_INT_BITS} bits")
        return _bounded(super().call_binop(context, operator, left, right))

    def call(__self, __context, __obj, *args: Any, **kwargs: Any) -> Any:  # jinja's own signature
        _check_arguments(args, kwargs)
        return _bounded(super().call(__context, __obj, *args, **kwargs))


def compile_template(source: str) -> Template:
    """A chat template compiled as transformers compiles it (trim_blocks, lstrip_blocks, loop controls,
    `raise_exception`, `strftime_now`, a `tojson` that keeps non-ASCII) in the bounded sandbox."""

    def raise_exception(message: str) -> None:
        raise Refusal(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
               sort_keys: bool = False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = _Environment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.filters.update({name: _bounded_filter(func) for name, func in env.filters.items()})
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def render_bounded(template: Template, context: dict[str, Any]) -> str:
    """The template's output, streamed so that it stops past `MAX_OUTPUT_CHARS`, with a deadline checked on
    every line of template code (a tracer that sees only template frames; any previous tracer is put back)."""
    deadline = time.monotonic() + RENDER_SECONDS

    def on_line(frame, event, arg):
        if time.monotonic() > deadline:
            raise Limit(f"ran for more than {RENDER_SECONDS:g} s")
        return on_line

    def on_call(frame, event, arg):
        return on_line if frame.f_code.co_filename == _TEMPLATE_FILE else None

    pieces, size = [], 0
    previous = sys.gettrace()
    sys.settrace(on_call)
    try:
        for piece in template.generate(**context):
            size += len(piece)
            if size > MAX_OUTPUT_CHARS:
                raise Limit(f"writes more than {MAX_OUTPUT_CHARS:,} characters")
            pieces.append(piece)
    finally:
        sys.settrace(previous)
    return "".join(pieces)
