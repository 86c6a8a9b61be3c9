"""Resolving `--model`: a local directory, or a Hub repo id — from the local Hugging Face cache when it holds the
model (no network then), downloaded into that cache otherwise, unless `HF_HUB_OFFLINE` is set."""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import ConfigError, HubError, InputError, PolylmError
from .files import read_text
from .weights import checkpoint_files

_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+(@[\w./-]+)?$")
_TRUE = ("1", "ON", "YES", "TRUE")


def cache_roots() -> list[Path]:
    """Where the Hugging Face hub cache may be, in huggingface_hub's order of precedence (downloads go to the
    first)."""
    roots = []
    if os.environ.get("HF_HUB_CACHE"):
        roots.append(Path(os.environ["HF_HUB_CACHE"]))
    if os.environ.get("HF_HOME"):
        roots.append(Path(os.environ["HF_HOME"]) / "hub")
    xdg = os.environ.get("XDG_CACHE_HOME")
    roots.append((Path(xdg) if xdg else Path.home() / ".cache") / "huggingface" / "hub")
    return list(dict.fromkeys(r.expanduser() for r in roots))


def offline() -> bool:
    """True when `HF_HUB_OFFLINE` (or `TRANSFORMERS_OFFLINE`) forbids the network: read now, as huggingface_hub
    reads them at its import."""
    return (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or "").upper() in _TRUE


def resolve_model(spec: str | os.PathLike, revision: str | None = None) -> Path:
    """The model directory for a path, or for an `org/name[@revision]` repo id (`revision` may be given apart).

    A repo id's snapshot comes from the local Hugging Face cache when one holds it complete; otherwise it is
    downloaded (only the files polylm reads) into the cache — never with `HF_HUB_OFFLINE=1`. A string that is not a
    repo id (a path that does not exist) never reaches the network.
    """
    path = Path(spec).expanduser()
    if path.is_dir():
        if revision is not None:
            raise InputError(f"{spec}: a revision ({revision!r}) selects a Hub repo's version, not a local "
                             "directory's; drop --revision")
        return path
    if path.exists():
        raise ConfigError(f"{spec}: is a file, not a model directory; pass the directory that holds config.json "
                          "and the *.safetensors files")
    text = str(spec)
    repo, _, pinned = text.partition("@")
    if not _REPO_ID.match(text) or text.startswith((".", "/")) or ".." in repo or "--" in repo:
        raise ConfigError(f"{text}: model directory not found")
    if pinned and revision is not None and pinned != revision:
        raise InputError(f"{text}: names revision {pinned!r}, and --revision {revision!r}; give one")
    revision = pinned or revision
    if revision is not None and (not revision or ".." in revision.split("/")):
        raise InputError(f"{text}: {revision!r} is not a revision (a branch, tag or commit)")
    snapshots = [s for root in cache_roots() if (s := _snapshot(root / _folder(repo), revision or "main"))]
    complete = [s for s in snapshots if _complete(s)]
    if complete:
        return complete[0]
    if offline():
        if snapshots:  # incomplete, and nothing can complete it: loading says what is missing
            return snapshots[0]
        looked = ", ".join(str(root / _folder(repo)) for root in cache_roots())
        raise HubError(f"{text}: not a local directory, and no cached snapshot of Hub repo {repo!r}"
                       f"{' at ' + revision if revision else ''} was found (looked in {looked}); HF_HUB_OFFLINE is "
                       f"set, so polylm does not download: unset it, or fetch the model with `hf download {repo}`")
    from .download import download

    return download(repo, revision, cache_roots()[0])


def _folder(repo: str) -> str:
    return "models--" + repo.replace("/", "--")


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


def _complete(snapshot: Path) -> bool:
    """Whether a cached snapshot holds a config and every weight file (an interrupted download leaves some out)."""
    if not (snapshot / "config.json").exists():
        return False
    try:
        checkpoint_files(snapshot)
    except PolylmError:
        return False
    return True
