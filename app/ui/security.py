"""The console's session, CSRF defence, security headers, and its bridge to the ``/v1`` API.

The session is the API key itself in an ``HttpOnly; SameSite=Strict`` cookie scoped to ``/ui``:
page scripts never see it, no other site's request carries it, it ends with the browser session,
and revoking the key ends the session at once (no second credential to revoke). It is never put
in a URL.

The console's scripts call the API through ``/ui/api/v1/...``: :class:`Console` checks the
request, turns the cookie into ``Authorization: Bearer`` and hands it to the very same ``/v1``
routes (same gate, rate limit, tenant isolation and problem+json answers), so the console adds
no second implementation of anything. A request that changes state must carry a CSRF token
(``X-CSRF-Token``, or a ``csrf`` form field for the sign-out form): a random nonce with its
HMAC under the session's key, rendered into each page. A page of another site can neither read
it nor compute it, and since it is bound to the key, a cookie planted by a sibling domain does
not help either. ``Origin`` / ``Sec-Fetch-Site`` are checked as well, on top.

Console pages get a strict Content-Security-Policy (scripts and styles from ``/ui/static``
only, no inline code, no framing). Anything answered through the bridge (JSON, artifacts) gets
a sandboxing policy instead: the engine's ``report.html``, embedded in a sandboxed frame, keeps
its inline styles and ``data:`` images but can run nothing and reaches nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from urllib.parse import parse_qs, urlsplit

from clipguard.app.auth import PROTECTED_PREFIX
from clipguard.app.problems import problem_response
from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

PREFIX = "/ui"
BRIDGE = PREFIX + "/api"
COOKIE = "clipguard_console"
CSRF_HEADER = "x-csrf-token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
KEY_SHAPE = re.compile(r"^[A-Za-z0-9_-]{1,200}$")
"""What a key issued by ``clipguard.app.auth.create_key`` looks like; anything else in the cookie is ignored."""

PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "frame-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
BRIDGED_CSP = "sandbox; default-src 'none'; style-src 'unsafe-inline'; img-src data:; frame-ancestors 'self'"
COMMON_HEADERS = {
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
    "cross-origin-opener-policy": "same-origin",
    "cross-origin-resource-policy": "same-origin",
}


def session_key(headers: Headers) -> str | None:
    """The API key in the session cookie, or None."""
    for part in headers.get("cookie", "").split(";"):
        name, _, value = part.strip().partition("=")
        if name == COOKIE and KEY_SHAPE.match(value):
            return value
    return None


def _mac(key: str, nonce: str) -> str:
    return hmac.new(key.encode(), f"clipguard-console-csrf:{nonce}".encode(), hashlib.sha256).hexdigest()


def csrf_token(key: str) -> str:
    """A fresh token for pages of this session: ``nonce.hmac(key, nonce)``."""
    nonce = secrets.token_urlsafe(16)
    return f"{nonce}.{_mac(key, nonce)}"


def csrf_ok(key: str, token: str | None) -> bool:
    nonce, _, mac = (token or "").partition(".")
    return bool(nonce) and hmac.compare_digest(mac, _mac(key, nonce))


def same_origin(headers: Headers) -> bool:
    """False when the browser says the request comes from another site (``Sec-Fetch-Site``, ``Origin``)."""
    if headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
        return False
    origin = headers.get("origin")
    return origin is None or urlsplit(origin).netloc == headers.get("host")


def cookie_header(key: str | None, *, secure: bool) -> str:
    """``Set-Cookie`` for a session (``key``) or for ending one (``None``)."""
    value, extra = (key, "") if key else ("", "; Max-Age=0")
    return f"{COOKIE}={value}; Path={PREFIX}; HttpOnly; SameSite=Strict{'; Secure' if secure else ''}{extra}"


class Console:
    """ASGI middleware for everything under ``/ui``: security headers on pages, the bridge to ``/v1``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if path.startswith(BRIDGE + "/"):
            await self._bridge(scope, receive, send)
        elif path == PREFIX or path.startswith(PREFIX + "/"):
            await self.app(scope, receive, _with_headers(send, {"content-security-policy": PAGE_CSP}))
        else:
            await self.app(scope, receive, send)

    async def _bridge(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = Headers(scope=scope)
        request = Request(scope)
        target = scope["path"][len(BRIDGE) :]
        if not target.startswith(PROTECTED_PREFIX + "/"):
            await problem_response(request, 404, "the console bridges only /v1 routes", kind="not-found")(
                scope, receive, send
            )
            return
        key = session_key(headers)
        if key is None:
            await problem_response(
                request,
                401,
                "not signed in to the console, or the session ended; sign in again at /ui/login",
                kind="unauthorized",
            )(scope, receive, send)
            return
        if scope["method"] not in SAFE_METHODS and not (
            same_origin(headers) and csrf_ok(key, headers.get(CSRF_HEADER))
        ):
            await problem_response(request, 403, "missing or invalid CSRF token; reload the page", kind="csrf")(
                scope, receive, send
            )
            return
        forwarded = [
            (k, v) for k, v in scope["headers"] if k not in (b"authorization", b"cookie", CSRF_HEADER.encode())
        ]
        forwarded.append((b"authorization", f"Bearer {key}".encode()))
        inline = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("inline") == ["1"]
        inner = {**scope, "path": target, "headers": forwarded}
        raw_path = inner.pop("raw_path", None)
        if raw_path and raw_path.startswith(BRIDGE.encode()):
            inner["raw_path"] = raw_path[len(BRIDGE) :]
        extra = {"content-security-policy": BRIDGED_CSP, "cache-control": "no-store"}
        await self.app(inner, receive, _with_headers(send, extra, inline=inline))


def _with_headers(send: Send, extra: dict[str, str], *, inline: bool = False) -> Send:
    """``send`` with ``extra`` and the common security headers set on the response (``inline``: shown, not saved)."""

    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = MutableHeaders(scope=message)
            for name, value in {**COMMON_HEADERS, **extra}.items():
                headers[name] = value
            if inline and "content-disposition" in headers:
                headers["content-disposition"] = "inline"
        await send(message)

    return wrapped
