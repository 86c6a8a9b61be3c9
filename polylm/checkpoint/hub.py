"""Resolving `--model`: a local directory, or a Hub repo id already in the local Hugging Face cache (offline)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import ConfigError
from .files import read_text

_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+(@[\w./-]+)?$")


def cache_roots() -> list[Path]:
    """Where the Hugging Face hub cache may be, in huggingface_hub's order of precedence."""
    roots = []
    if os.environ.get("HF_HUB_CACHE"):
        roots.append(Path(os.environ["HF_HUB_CACHE"]))
    if os.environ.get("HF_HOME"):
        roots.append(Path(os.environ["HF_HOME"]) / "hub")
    xdg = os.environ.get("XDG_CACHE_HOME")
    roots.append((Path(xdg) if xdg else Path.home() / ".cache") / "huggingface" / "hub")
    return list(dict.fromkeys(r.expanduser() for r in roots))


def resolve_model(spec: str | os.PathLike) -> Path:
    """The model directory for a path or a cached `org/name[@revision]` repo id."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ConfigError(f"{spec}: is a file, not a model directory; pass the directory that holds config.json "
                          "and the *.safetensors files")
    text = str(spec)
    if not _REPO_ID.match(text) or text.startswith((".", "/")):
        raise ConfigError(f"{text}: model directory not found")
    repo, _, revision = text.partition("@")
    folder = "models--" + repo.replace("/", "--")
    looked = []
    for root in cache_roots():
        repo_dir = root / folder
        looked.append(str(repo_dir))
        snapshot = _snapshot(repo_dir, revision or "main")
        if snapshot is not None:
            return snapshot
    raise ConfigError(f"{text}: not a local directory, and no cached snapshot of Hub repo {repo!r}"
                      f"{' at ' + revision if revision else ''} was found (looked in {', '.join(looked)}); "
                      f"polylm does not download — fetch it first with `hf download {repo}` (huggingface_hub's "
                      "command line)")


def _snapshot(repo_dir: Path, revision: str) -> Path | None:
    snapshots = repo_dir / "snapshots"
    if not snapshots.is_dir():
        return None
    ref = repo_dir / "refs" / revision
    commit = read_text(ref, 1024).strip() if ref.exists() and not ref.is_dir() else revision
    candidate = snapshots / commit
    if candidate.is_dir() and ".." not in Path(commit).parts:
        return candidate
    return None
