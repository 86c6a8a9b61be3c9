"""polylm: decoder language models from Hugging Face checkpoints on MLX, Triton and torch, from one IR."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from .errors import PolylmError
from .loading import load
from .model import Model

try:
    __version__ = version("polylm")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0"


def backends() -> list[dict]:
    """Installed backends in auto-selection order, each with whether it runs here and why (not)."""
    from .loading.registry import registry

    return [b.describe() for b in registry().ranked_backends()]


def families() -> list[dict]:
    """Installed families: model types, tasks, and the distribution that registered each."""
    from .loading.registry import registry

    return [{"model_type": t, "family": f.name, "tasks": f.tasks, "distribution": info.distribution,
             "version": info.version} for t, (f, info) in sorted(registry().families.items())]


__all__ = ["Model", "PolylmError", "backends", "families", "load", "__version__"]
