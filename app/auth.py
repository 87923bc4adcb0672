"""Bearer API keys: random 256-bit secrets, stored only as their sha256, each bound to a tenant.

A plain sha256 is enough (no slow KDF) because the keys are high-entropy random strings,
not passwords; the lookup by digest through a unique index leaks nothing useful by timing.
Revoking a key deletes its row, so a revoked key is indistinguishable from one that never
existed (401 either way) and takes effect on the very next request: nothing caches keys.
"""

from __future__ import annotations

import hashlib
import secrets

import anyio.to_thread
from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from app.db import ApiKey
from app.problems import problem_response

KEY_PREFIX = "cg_"
PROTECTED_PREFIX = "/v1"
"""Every route under this prefix needs a key; health, metrics and the OpenAPI document do not."""


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(sessions: sessionmaker, tenant: str) -> str:
    """Store a new key for ``tenant`` and return it; this is the only time it exists in clear."""
    if not tenant.strip():
        raise ValueError("tenant name must not be empty")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    with sessions.begin() as s:
        s.add(ApiKey(tenant=tenant.strip(), key_hash=digest(key)))
    return key


def revoke_key(sessions: sessionmaker, key: str) -> bool:
    """Revoke one key (given in clear, as the operator received it); False if it was not known."""
    with sessions.begin() as s:
        return s.execute(delete(ApiKey).where(ApiKey.key_hash == digest(key))).rowcount == 1


def revoke_tenant(sessions: sessionmaker, tenant: str) -> int:
    """Revoke every key of ``tenant``; returns how many there were. Its jobs and models stay."""
    with sessions.begin() as s:
        return s.execute(delete(ApiKey).where(ApiKey.tenant == tenant)).rowcount


def tenant_for(s: Session, key: str) -> str | None:
    return s.scalar(select(ApiKey.tenant).where(ApiKey.key_hash == digest(key)))


def bearer_token(headers: Headers) -> str | None:
    scheme, _, token = headers.get("authorization", "").partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def unauthorized(request: Request) -> JSONResponse:
    """The one answer for a missing, unknown or revoked key: the same body, so it tells an attacker nothing."""
    return problem_response(request, 401, "missing or unknown API key; send `Authorization: Bearer <key>`",
                            kind="unauthorized", headers={"WWW-Authenticate": "Bearer"})


class Gate:
    """Authenticate, then rate-limit, every ``/v1`` request *before* its body is read.

    FastAPI reads a request's body (a multipart upload is spooled to disk) before it runs
    the dependencies that check the key, so without this gate anyone could make the server
    store up to the upload cap per request with no key at all, and a throttled client could
    keep uploading. The tenant found here is left in ``request.state.tenant`` for
    ``app.deps.get_tenant``, so the key is looked up once per request.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if not (path == PROTECTED_PREFIX or path.startswith(PROTECTED_PREFIX + "/")):
            await self.app(scope, receive, send)
            return
        state = scope["app"].state
        token = bearer_token(Headers(scope=scope))

        def lookup() -> str | None:
            with state.sessions() as s:
                return tenant_for(s, token) if token else None

        tenant = await anyio.to_thread.run_sync(lookup) if token else None
        if tenant is None:
            await unauthorized(Request(scope))(scope, receive, send)
            return
        limiter = getattr(state, "ratelimiter", None)
        verdict = await limiter.hit(digest(token)) if limiter is not None else None
        if verdict is not None and not verdict.allowed:
            response = problem_response(
                Request(scope), 429, f"more than {verdict.limit} requests a minute with this API key; "
                f"retry in {verdict.retry_after_s} s", kind="rate-limited",
                headers={"Retry-After": str(verdict.retry_after_s)})
            await response(scope, receive, send)
            return
        scope.setdefault("state", {})["tenant"] = tenant
        await self.app(scope, receive, send)
