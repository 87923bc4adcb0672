"""Prometheus metrics: request counts and latency per route, job creations, jobs per state.

The jobs-per-state gauge is read from the job store at scrape time, so every API replica
reports the same, true numbers.
"""

from __future__ import annotations

import time

from fastapi import Response
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest
from sqlalchemy import func, select
from sqlalchemy.orm import sessionmaker
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.db import Job

REQUESTS = Counter("clipguard_http_requests_total", "HTTP requests", ["method", "route", "status"])
LATENCY = Histogram("clipguard_http_request_duration_seconds", "HTTP request latency", ["method", "route"])
JOBS_CREATED = Counter("clipguard_jobs_created_total", "purify jobs created")
JOBS = Gauge("clipguard_jobs", "jobs in the store by state", ["state"])
STATES = ("queued", "running", "succeeded", "failed", "cancelled")


class Observe:
    """Count requests and time them per route template (a plain ASGI middleware, so exceptions
    raised while the body streams reach the problem handlers unwrapped)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def capture(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            path = getattr(scope.get("route"), "path", "unmatched")  # the template: ids must not become labels
            REQUESTS.labels(scope["method"], path, str(status)).inc()
            LATENCY.labels(scope["method"], path).observe(time.perf_counter() - start)


def render(sessions: sessionmaker) -> Response:
    with sessions() as s:
        counts = dict(s.execute(select(Job.state, func.count()).group_by(Job.state)).tuples().all())
    for state in STATES:
        JOBS.labels(state).set(counts.get(state, 0))
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
