"""Placeholder: the llama family mapping lands here."""

from polylm.hookspecs import hookimpl


@hookimpl
def polylm_families() -> list:
    return []
