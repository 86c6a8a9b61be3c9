"""The chat page `polylm serve` answers at `/`: one static file (chat.html, inline CSS and JS, nothing fetched from
elsewhere) that talks to this server's own OpenAI API. Its Content-Security-Policy lets exactly that file's
inline script and style run (by their hashes) and lets it connect to this origin alone."""

from __future__ import annotations

import base64
import functools
import hashlib
import re
from importlib import resources

from starlette.responses import Response


def _hashes(html: str, tag: str) -> str:
    """CSP sources for the contents of each inline <tag> element."""
    bodies = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.DOTALL)
    return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in bodies)


@functools.cache
def _page() -> tuple[str, str]:
    """The page's HTML and its Content-Security-Policy, read once."""
    html = resources.files(__package__).joinpath("chat.html").read_text(encoding="utf-8")
    return html, (f"default-src 'none'; script-src {_hashes(html, 'script')}; style-src {_hashes(html, 'style')}; "
                  "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def chat_page() -> Response:
    """The page, with headers that keep it from being framed, sniffed or given a referrer."""
    html, policy = _page()
    return Response(html, media_type="text/html; charset=utf-8",
                    headers={"content-security-policy": policy, "x-content-type-options": "nosniff",
                             "referrer-policy": "no-referrer", "cache-control": "no-cache"})
