"""Progress bars (tqdm) for long steps, shown only when stderr is a terminal and not silenced."""

from __future__ import annotations

import os
import sys
from typing import Iterable, TypeVar

T = TypeVar("T")


def quiet() -> bool:
    """True when progress bars are off: `--quiet`, POLYLM_QUIET=1, or stderr not a terminal."""
    return os.environ.get("POLYLM_QUIET", "") not in ("", "0") or not sys.stderr.isatty()


def progress(items: Iterable[T], *, total: int, desc: str, unit: str = "it") -> Iterable[T]:
    """`items`, with a progress bar when there is more than one and bars are on."""
    if total < 2 or quiet():
        return items
    from tqdm import tqdm

    return tqdm(items, total=total, desc=desc, unit=unit, leave=False)
