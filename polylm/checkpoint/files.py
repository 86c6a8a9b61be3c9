"""Reading a checkpoint's files safely: regular files only (links to them included, as the Hugging Face cache
makes them), within a size limit, and JSON parsed into a typed error whatever it holds.

A named pipe, a device (`/dev/zero`), a socket or a directory under a checkpoint file's name is refused before
a byte is read, so no read hangs or grows without bound; every error names the file.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import ConfigError, PolylmError

#: Limits in bytes. JSON side files (config, tokenizer_config, generation_config, chat_template.json) are
#: kilobytes in practice; tokenizer.json can reach tens of megabytes; a chat template a few kilobytes (a
#: template's length in characters has its own, smaller limit: polylm.generate.chat.MAX_TEMPLATE_CHARS).
MAX_JSON_BYTES = 16 * 2**20
MAX_TOKENIZER_BYTES = 2**30
MAX_TEMPLATE_BYTES = 256 * 2**10

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)  # opening a pipe swapped in after the check must not wait for a writer


def open_regular(path: Path, error: type[PolylmError] = ConfigError, missing: str = "") -> BinaryIO:
    """`path` opened for binary reading, or `error` naming it when it is absent or not a regular file.

    `missing` is appended to the "file not found" message (e.g. what the file is needed for).
    """
    try:
        _check_regular(path, os.stat(path).st_mode, error)
        handle = os.fdopen(os.open(path, os.O_RDONLY | _NONBLOCK), "rb")
    except FileNotFoundError:
        raise error(f"{path}: file not found{missing}") from None
    except OSError as exc:
        raise error(f"{path}: cannot read ({exc.strerror})") from None
    try:
        _check_regular(path, os.fstat(handle.fileno()).st_mode, error)
    except PolylmError:
        handle.close()
        raise
    return handle


def _check_regular(path: Path, mode: int, error: type[PolylmError]) -> None:
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
        raise error(f"{path}: is {kind}, not a regular file; polylm reads only regular files (or links to them)")


def read_bytes(path: Path, limit: int, error: type[PolylmError] = ConfigError, missing: str = "") -> bytes:
    """The content of the regular file `path`, refused (naming it) when larger than `limit` bytes."""
    with open_regular(path, error, missing) as handle:
        try:
            size = os.fstat(handle.fileno()).st_size
            data = handle.read(limit + 1) if size <= limit else b""
        except OSError as exc:
            raise error(f"{path}: cannot read ({exc.strerror})") from None
    if size > limit or len(data) > limit:
        raise error(f"{path}: {max(size, len(data)):,} bytes is larger than the {limit:,} bytes polylm reads "
                    "from a file of its kind")
    return data


def read_text(path: Path, limit: int, error: type[PolylmError] = ConfigError, missing: str = "") -> str:
    """`read_bytes` decoded as UTF-8, naming the file and the byte offset when it is not UTF-8."""
    data = read_bytes(path, limit, error, missing)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 text (byte {exc.start} is {data[exc.start]:#04x})") from None


class _DuplicateKey(Exception):
    pass


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise _DuplicateKey(key)
        obj[key] = value
    return obj


def parse_json(raw: bytes | str, path: Path | str, error: type[PolylmError] = ConfigError, *,
               unique_keys: bool = False, what: str = "") -> Any:
    """Parse JSON, turning every failure (syntax, encoding, nesting too deep for the parser, an integer of
    thousands of digits, a repeated key when `unique_keys`) into `error` naming `path` (and `what` it is)."""
    where = f"{path}: {what + ': ' if what else ''}"
    try:
        return json.loads(raw, parse_constant=float, object_pairs_hook=_unique_object if unique_keys else None)
    except json.JSONDecodeError as exc:
        raise error(f"{path}: {what + ' is ' if what else ''}not valid JSON ({exc.msg} at line {exc.lineno} "
                    f"column {exc.colno})") from None
    except UnicodeDecodeError as exc:
        raise error(f"{where}not UTF-8 text (byte {exc.start})") from None
    except RecursionError:
        raise error(f"{where}JSON nested too deeply to read") from None
    except _DuplicateKey as exc:
        raise error(f"{where}key {exc.args[0]!r} appears more than once") from None
    except ValueError:  # int() refusing a number of more than sys.get_int_max_str_digits() digits
        raise error(f"{where}holds a number with too many digits to read") from None


def read_json(path: Path, limit: int = MAX_JSON_BYTES, error: type[PolylmError] = ConfigError,
              missing: str = "") -> Any:
    """A JSON side file: a regular file of at most `limit` bytes, parsed; every failure names the file."""
    return parse_json(read_bytes(path, limit, error, missing), path, error)
