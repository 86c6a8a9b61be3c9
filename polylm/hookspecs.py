"""The plugin seams. Plugins are modules exposed in the entry-point group `polylm` with `@hookimpl` functions.

A family or backend record carries `api_version`; polylm refuses records of another version with a message
instead of failing later with an AttributeError.
"""

from __future__ import annotations

import pluggy

from .backend import Backend
from .family import Family

PROJECT = "polylm"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def polylm_families() -> list[Family]:
    """Called once when the registry loads; return the model families this plugin adds."""


@hookspec
def polylm_backends() -> list[Backend]:
    """Called once when the registry loads; return the backends this plugin adds."""
