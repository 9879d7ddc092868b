"""Who may act: every action (cancel, retry, tag, submit) needs the dashboard's token in a
request header, and comes from the dashboard's own origin.

The token travels only in a header (``Authorization: Bearer …`` or ``X-Tuneq-Token``), never
in a cookie or a form field, so a page on another site cannot make a browser send it; a
request that says it comes from elsewhere (``Origin``, ``Sec-Fetch-Site``) is refused before
the token is even looked at.
"""

from __future__ import annotations

import contextlib
import secrets
import socket
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


LOOPBACK = ("localhost", "127.0.0.1", "::1")
ANY_ADDRESS = ("0.0.0.0", "::", "")


def allowed_hosts(listen_host: str, public: tuple[str, ...]) -> list[str]:
    """The host names a request may be addressed to: loopback, the address listened on (or,
    listening on every address, this machine's names and addresses), and ``public`` (the
    names a proxy or the network gives it; ``*`` for any). A page on another site whose name
    was made to resolve here (DNS rebinding) names its own host, and is refused."""
    hosts = {*LOOPBACK, *public}
    if listen_host in ANY_ADDRESS:
        name = socket.gethostname()
        hosts |= {name.lower(), socket.getfqdn().lower()}
        with contextlib.suppress(OSError):  # a name that does not resolve has no addresses
            hosts |= set(socket.gethostbyname_ex(name)[2])
    else:
        hosts.add(listen_host.lower())
    return sorted(hosts)


def check_action(request: Request, token: str, public: tuple[str, ...] = ()) -> None:
    """Raise ``Refused`` unless ``request`` comes from this origin (or one of the ``public``
    names a proxy serves it under) and carries ``token``."""
    if not same_origin(request, public):
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


def same_origin(request: Request, public: tuple[str, ...] = ()) -> bool:
    """False when the browser says the request comes from another site or origin. Behind a
    proxy that rewrites Host, the page's origin is one of the ``public`` names."""
    if request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
        return False
    origin = request.headers.get("origin")
    if origin is None:
        return True  # not sent by a browser's cross-site request (curl, scripts)
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https"):
        return False
    return parts.netloc == request.headers.get("host", "") or (parts.hostname or "") in public
