"""Liveness, readiness (database and broker reachable, a worker consuming the queue) and Prometheus metrics."""

from __future__ import annotations

import math
import time

from clipguard.app import metrics
from clipguard.app.deps import CeleryDep, SessionsDep, SettingsDep
from clipguard.app.presence import FRESH_BEATS, live_workers
from clipguard.app.problems import ProblemError
from fastapi import APIRouter, Request, Response
from sqlalchemy import text

router = APIRouter(tags=["ops"])
WORKERS_CACHE_S = 2.0
"""A probe every second costs one count query every two."""


@router.get("/healthz")
def healthz() -> dict:
    """The process answers; depends on nothing else."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "database or broker unreachable, or no worker"}})
def readyz(request: Request, sessions: SessionsDep, celery: CeleryDep, settings: SettingsDep) -> dict:
    """Ready to take jobs: the job store answers a query, the broker accepts a connection, and a worker
    consumes the queue (a fresh heartbeat in the job store, ``clipguard.app.presence``; unless
    ``ready_requires_worker`` is off). The worker count is remembered for ``WORKERS_CACHE_S``."""
    try:
        with sessions() as s:
            s.execute(text("SELECT 1"))
    except Exception as exc:
        raise ProblemError(503, f"database unreachable: {type(exc).__name__}", kind="not-ready") from exc
    try:
        with celery.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
    except Exception as exc:
        raise ProblemError(503, f"broker unreachable: {type(exc).__name__}", kind="not-ready") from exc
    if settings.ready_requires_worker:
        seen_at, count = getattr(request.app.state, "workers_seen", (-math.inf, 0))
        if time.monotonic() - seen_at > WORKERS_CACHE_S:
            count = live_workers(sessions, settings.heartbeat_s)
            request.app.state.workers_seen = (time.monotonic(), count)
        if not count:
            raise ProblemError(
                503,
                "no worker is consuming the job queue (none has sent a heartbeat within "
                f"{FRESH_BEATS * settings.heartbeat_s:g} s)",
                kind="not-ready",
            )
    return {"status": "ready"}


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
def prometheus(sessions: SessionsDep, celery: CeleryDep) -> Response:
    return metrics.render(sessions, celery)
