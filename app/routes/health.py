"""Liveness, readiness (database and broker reachable) and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from sqlalchemy import text

from app import metrics
from app.deps import CeleryDep, SessionsDep
from app.problems import ProblemError

router = APIRouter(tags=["ops"])


@router.get("/healthz")
def healthz() -> dict:
    """The process answers; depends on nothing else."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "database or broker unreachable"}})
def readyz(sessions: SessionsDep, celery: CeleryDep) -> dict:
    """Ready to take jobs: the job store answers a query and the broker accepts a connection."""
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
    return {"status": "ready"}


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
def prometheus(sessions: SessionsDep, celery: CeleryDep) -> Response:
    return metrics.render(sessions, celery)
