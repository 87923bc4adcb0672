"""Bearer API keys: random 256-bit secrets, stored only as their sha256, each bound to a tenant.

A plain sha256 is enough (no slow KDF) because the keys are high-entropy random strings,
not passwords; the lookup by digest through a unique index leaks nothing useful by timing.
Revoking a key deletes its row, so a revoked key is indistinguishable from one that never
existed (401 either way).

Each API process remembers the keys it has seen for ``KEY_CACHE_TTL_S`` seconds (:class:`KeyCache`,
digest -> tenant): the lookup was a database round trip and a thread hop on every request, most
of a status poll's cost. Revoking through :func:`revoke_key` / :func:`revoke_tenant` clears the
entries of every cache in the revoking process at once, so there the next request is refused; other
processes (API replicas, or an API beside the ``clipguard keys revoke`` command) refuse the key once
their entry expires, within ``KEY_CACHE_TTL_S``. Unknown keys are never cached, so made-up keys
cannot fill the cache and a new key works at once.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import anyio.to_thread
from clipguard.app.db import ApiKey, reader
from clipguard.app.problems import error_response, problem_response, store_unavailable
from sqlalchemy import delete, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

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
    key_hash = digest(key)
    with sessions.begin() as s:
        found = s.execute(delete(ApiKey).where(ApiKey.key_hash == key_hash)).rowcount == 1
    for cache in list(_CACHES):  # after the commit: a lookup racing the delete cannot re-cache it (generation)
        cache.forget(lambda d, _t: d == key_hash)
    return found


def revoke_tenant(sessions: sessionmaker, tenant: str) -> int:
    """Revoke every key of ``tenant``; returns how many there were. Its jobs and models stay."""
    with sessions.begin() as s:
        count = s.execute(delete(ApiKey).where(ApiKey.tenant == tenant)).rowcount
    for cache in list(_CACHES):
        cache.forget(lambda _d, t: t == tenant)
    return count


def tenant_for(s: Session, key: str) -> str | None:
    return s.scalar(select(ApiKey.tenant).where(ApiKey.key_hash == digest(key)))


def tenant_for_digest(sessions: sessionmaker, key_hash: str) -> str | None:
    """One autocommit ``SELECT`` (no ``BEGIN``/``ROLLBACK`` round trips): the gate's lookup on a cache miss."""
    with reader(sessions).connect() as conn:
        return conn.scalar(select(ApiKey.tenant).where(ApiKey.key_hash == key_hash))


class KeyCache:
    """Key digest -> tenant for ``ttl_s`` seconds, in one API process; ``ttl_s = 0`` caches nothing.

    A lookup that started before a revocation must not store what it read: every
    :meth:`forget` bumps ``generation``, and :meth:`put` drops an entry read under an older one.
    """

    MAX_ENTRIES = 10_000
    """Beyond this (only valid keys are stored, so it takes that many live keys) expired entries go, then all."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self.generation = 0
        self._entries: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()  # revocations come from other threads (an admin call, a test)
        _CACHES.add(self)

    def get(self, key_hash: str) -> str | None:
        entry = self._entries.get(key_hash)
        if entry is None:
            return None
        if entry[1] < time.monotonic():
            self._entries.pop(key_hash, None)
            return None
        return entry[0]

    def put(self, key_hash: str, tenant: str, generation: int) -> None:
        if self.ttl_s <= 0:
            return
        with self._lock:
            if generation != self.generation:
                return
            if len(self._entries) >= self.MAX_ENTRIES:
                now = time.monotonic()
                self._entries = {d: e for d, e in self._entries.items() if e[1] >= now}
                if len(self._entries) >= self.MAX_ENTRIES:
                    self._entries = {}
            self._entries[key_hash] = (tenant, time.monotonic() + self.ttl_s)

    def forget(self, match: Callable[[str, str], bool]) -> None:
        """Drop every entry ``match(digest, tenant)`` selects, and invalidate lookups in flight."""
        with self._lock:
            self.generation += 1
            self._entries = {d: e for d, e in self._entries.items() if not match(d, e[0])}


_CACHES: weakref.WeakSet[KeyCache] = weakref.WeakSet()
"""Every live cache in this process, so that a revocation reaches them all."""


def bearer_token(headers: Headers) -> str | None:
    scheme, _, token = headers.get("authorization", "").partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def unauthorized(request: Request) -> JSONResponse:
    """The one answer for a missing, unknown or revoked key: the same body, so it tells an attacker nothing."""
    return problem_response(
        request,
        401,
        "missing or unknown API key; send `Authorization: Bearer <key>`",
        kind="unauthorized",
        headers={"WWW-Authenticate": "Bearer"},
    )


async def tenant_of(state: Any, key_hash: str) -> str | None:
    """The tenant of a key digest, through the process's :class:`KeyCache` (``state.key_cache``) when it has one.

    Raises ``OperationalError`` when the job store cannot be asked.
    """
    cache: KeyCache | None = getattr(state, "key_cache", None)
    tenant = cache.get(key_hash) if cache is not None else None
    if tenant is None:
        generation = cache.generation if cache is not None else 0
        tenant = await anyio.to_thread.run_sync(tenant_for_digest, state.sessions, key_hash)
        if tenant is not None and cache is not None:
            cache.put(key_hash, tenant, generation)
    return tenant


class Gate:
    """Authenticate, then rate-limit, every ``/v1`` request *before* its body is read.

    FastAPI reads a request's body (a multipart upload is spooled to disk) before it runs
    the dependencies that check the key, so without this gate anyone could make the server
    store up to the upload cap per request with no key at all, and a throttled client could
    keep uploading. The tenant found here is left in ``request.state.tenant`` for
    ``clipguard.app.deps.get_tenant``, so the key is looked up once per request.
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
        key_hash = digest(token) if token else None
        try:
            tenant = await tenant_of(state, key_hash) if key_hash else None
        except OperationalError as exc:  # outside the routes' exception handlers: answer the 503 here
            await error_response(Request(scope), store_unavailable(type(exc.orig).__name__))(scope, receive, send)
            return
        if tenant is None or key_hash is None:
            await unauthorized(Request(scope))(scope, receive, send)
            return
        limiter = getattr(state, "ratelimiter", None)
        verdict = await limiter.hit(key_hash) if limiter is not None else None
        if verdict is not None and not verdict.allowed:
            response = problem_response(
                Request(scope),
                429,
                f"more than {verdict.limit} requests a minute with this API key; retry in {verdict.retry_after_s} s",
                kind="rate-limited",
                headers={"Retry-After": str(verdict.retry_after_s)},
            )
            await response(scope, receive, send)
            return
        scope.setdefault("state", {})["tenant"] = tenant
        await self.app(scope, receive, send)
