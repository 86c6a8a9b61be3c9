"""Downloading a Hub repo's model files into the Hugging Face cache with huggingface_hub, failures as `HubError`.

Only what polylm reads is fetched: config, generation config, tokenizer files, chat template and safetensors
weights (never pickled weights, READMEs or other formats). huggingface_hub reads `HF_TOKEN` (or the token of
`hf auth login`) itself.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import HubError
from ..progress import quiet

ALLOW_PATTERNS = [
    "config.json", "generation_config.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "added_tokens.json",
    "vocab.json", "vocab.txt", "merges.txt",
    "chat_template.jinja", "chat_template.json",
    "*.safetensors", "*.safetensors.index.json",
]
_LOGIN = "log in with `hf auth login` or set HF_TOKEN"


def endpoint() -> str:
    """The Hub's address: `HF_ENDPOINT` as huggingface_hub reads it, read now rather than at its import."""
    return os.environ.get("HF_ENDPOINT", "").rstrip("/") or "https://huggingface.co"


def download(repo: str, revision: str | None, cache_dir: Path) -> Path:
    """The snapshot directory of `repo` at `revision` (default branch when None) in `cache_dir`, after fetching
    the files of `ALLOW_PATTERNS` it lacks; a progress bar on stderr unless bars are off."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import tqdm as hf_tqdm

    class Silent(hf_tqdm):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **{**kwargs, "disable": True})

    try:
        folder = snapshot_download(repo, revision=revision, cache_dir=cache_dir, allow_patterns=ALLOW_PATTERNS,
                                   endpoint=endpoint(), tqdm_class=Silent if quiet() else None)
    except Exception as exc:  # noqa: BLE001 - every failure of the download becomes one line naming the repo
        raise hub_error(exc, repo, revision) from None
    return Path(folder)


def hub_error(exc: Exception, repo: str, revision: str | None) -> HubError:
    """What went wrong fetching `repo`, and what to do about it, in one line."""
    from huggingface_hub.utils import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                       RepositoryNotFoundError, RevisionNotFoundError)

    where = f"Hub repo {repo!r} at {endpoint()}"
    if isinstance(exc, GatedRepoError):
        return HubError(f"{where} is gated: accept its conditions at {endpoint()}/{repo}, then {_LOGIN} with a "
                        "token of the account that did")
    if isinstance(exc, RevisionNotFoundError):
        return HubError(f"{where} has no revision {revision!r}: pass a branch, tag or commit of the repo "
                        "(--revision or ORG/NAME@REVISION)")
    if isinstance(exc, RepositoryNotFoundError):
        return HubError(f"{where} does not exist or is private: check the name, or {_LOGIN} if it is private")
    status = getattr(getattr(exc, "response", None), "status_code", None) if isinstance(exc, HfHubHTTPError) \
        else None
    if status in (401, 403):
        return HubError(f"{where} refused access (HTTP {status}): {_LOGIN} with a valid token")
    if isinstance(exc, LocalEntryNotFoundError) or status is not None:
        cause = f"HTTP {status}" if status else type(exc.__cause__ or exc).__name__
        return HubError(f"{where} could not be reached ({cause}), and the model is not in the local cache: check "
                        "the network connection (and HF_ENDPOINT, if set)")
    text = " ".join(str(exc).split())[:200] or type(exc).__name__
    return HubError(f"{where}: download failed ({type(exc).__name__}: {text})")
