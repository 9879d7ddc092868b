"""Who may act: every action (cancel, retry, tag, submit) needs the dashboard's token in a
request header, and comes from the dashboard's own origin.

The token travels only in a header (``Authorization: Bearer …`` or ``X-Tuneq-Token``), never
in a cookie or a form field, so a page on another site cannot make a browser send it; a
request that says it comes from elsewhere (``Origin``, ``Sec-Fetch-Site``) is refused before
the token is even looked at.
"""

from __future__ import annotations

import secrets
from urllib.parse import urlsplit

from starlette.requests import Request

TOKEN_HEADER = "x-tuneq-token"


class Refused(Exception):
    """An action the request may not take: ``status`` is 401 (no or wrong token) or 403
    (another origin)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def new_token() -> str:
    return secrets.token_urlsafe(24)


def check_action(request: Request, token: str) -> None:
    """Raise ``Refused`` unless ``request`` comes from this origin and carries ``token``."""
    if not same_origin(request):
        raise Refused(403, "actions are taken from the dashboard's own pages only")
    given = presented_token(request)
    if not given:
        raise Refused(401, "this action needs the dashboard's token (TUNEQ_UI_TOKEN)")
    if not secrets.compare_digest(given.encode(), token.encode()):
        raise Refused(401, "wrong token")


def presented_token(request: Request) -> str | None:
    authorization = request.headers.get("authorization", "")
    if authorization.lower().startswith("bearer "):
        return authorization[7:].strip() or None
    return request.headers.get(TOKEN_HEADER) or None


def same_origin(request: Request) -> bool:
    """False when the browser says the request comes from another site or origin."""
    if request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
        return False
    origin = request.headers.get("origin")
    if origin is None:
        return True  # not sent by a browser's cross-site request (curl, scripts)
    parts = urlsplit(origin)
    host = request.headers.get("host", "")
    return parts.scheme in ("http", "https") and parts.netloc == host
