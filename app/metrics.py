"""Prometheus metrics, all served by the API on ``/metrics``.

In process (per API replica): request counts and latency per route template, jobs created.

Read at scrape time (the same, true numbers on every replica; aggregate them with ``max``, not ``sum``):

* ``clipguard_jobs{state}``: jobs in the store by state;
* ``clipguard_queue_depth{queue}``: messages waiting in the broker (``LLEN`` of the queue on Redis);
* ``clipguard_job_stage_duration_seconds{stage}``: histogram of the engine's stages
  (load, bounds, select_lambda, export, evaluate) over succeeded jobs;
* ``clipguard_bounds_throughput_images_per_second``: histogram of the bounds pass's speed per job;
* ``clipguard_job_failures_total{reason}``: failed jobs by reason.

Why the worker-side numbers come from the job store and not from the workers: a worker's child
process lives for one job (``max_tasks_per_child=1``) and workers run on other hosts, so in-process
metrics there would need ``prometheus_client``'s multiprocess mode on every host *and* a scrape target
per worker. The worker already writes every job's outcome to the store, the source of truth: the
stage timings the engine reports (``report["timings"]``) go into the job's ``summary``, the failure
into its ``error``. Aggregating those with SQL at scrape time needs no extra process, no port, no
schema change, and gives counters that survive restarts of API and workers alike. The cost is one
aggregate query over the jobs table per scrape (one scan; fine at a scrape every 15-60 s).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

from celery import Celery
from clipguard.app.db import Job
from clipguard.app.queues import GPU_QUEUE
from fastapi import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import case, func, select
from sqlalchemy.orm import sessionmaker
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from clipguard.stages import TIMED

log = logging.getLogger("clipguard.api")

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


STAGES = tuple(stage.value for stage in TIMED)
"""The engine's timed stages, as its progress callback names them; ``summary["timings"]`` uses the same keys."""
STAGE_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 14400.0)
THROUGHPUT_BUCKETS = (10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0, 10000.0, 30000.0, 100000.0)
FAILURE_REASONS = (
    # (reason, how the job's error starts): the first words of every failure message the worker and
    # the sweeper write (worker/tasks.py, app/store.py); anything else is the engine refusing the input.
    ("time_limit", "time limit exceeded"),
    ("internal_error", "internal error"),
    ("worker_lost", "gave up after"),
    ("worker_lost", "worker lost"),
    ("disk_full", "no space left"),
    ("memory_limit", "memory limit exceeded"),
    ("stalled", "no progress for"),
)
OTHER_FAILURE = "invalid_input"


def failure_reason(error: str | None) -> str:
    """The reason label of a failed job's ``error`` (the same rule as the SQL in :class:`StoreCollector`)."""
    return next((reason for reason, prefix in FAILURE_REASONS if (error or "").startswith(prefix)), OTHER_FAILURE)


class StoreCollector(Collector):
    """Metrics computed from the job store and the broker when Prometheus scrapes."""

    def __init__(self, sessions: sessionmaker, celery: Celery | None) -> None:
        self.sessions, self.celery = sessions, celery

    def collect(self) -> Iterator[Metric]:
        if self.celery is not None:
            depth = queue_depth(self.celery, GPU_QUEUE)
            if depth is not None:
                gauge = GaugeMetricFamily("clipguard_queue_depth", "messages waiting in the broker", labels=["queue"])
                gauge.add_metric([GPU_QUEUE], depth)
                yield gauge
        with self.sessions() as s:
            yield self._histogram(
                s,
                "clipguard_job_stage_duration_seconds",
                "engine stage durations of succeeded jobs",
                {stage: Job.summary[("timings", stage)].as_float() for stage in STAGES},
                STAGE_BUCKETS,
                "stage",
            )
            yield self._histogram(
                s,
                "clipguard_bounds_throughput_images_per_second",
                "bounds pass speed of succeeded jobs",
                {None: Job.summary[("bounds_images_per_s",)].as_float()},
                THROUGHPUT_BUCKETS,
                None,
            )
            reason = case(
                *[(Job.error.startswith(p, autoescape=True), r) for r, p in FAILURE_REASONS], else_=OTHER_FAILURE
            )
            rows = s.execute(select(reason, func.count()).where(Job.state == "failed").group_by(reason)).all()
        failures = CounterMetricFamily("clipguard_job_failures", "failed jobs by reason", labels=["reason"])
        counts = dict(rows)
        for name in dict.fromkeys([*(r for r, _ in FAILURE_REASONS), OTHER_FAILURE]):
            failures.add_metric([name], counts.get(name, 0))
        yield failures

    @staticmethod
    def _histogram(
        s: Any,
        name: str,
        documentation: str,
        values: dict[str | None, Any],
        buckets: tuple[float, ...],
        label: str | None,
    ) -> HistogramMetricFamily:
        """One SQL aggregate per label value: cumulative bucket counts, the sum and the count."""
        family = HistogramMetricFamily(name, documentation, labels=[label] if label else None)
        done = Job.state == "succeeded"
        for key, value in values.items():
            row = s.execute(
                select(
                    *[func.coalesce(func.sum(case((value <= b, 1), else_=0)), 0) for b in buckets],
                    func.coalesce(func.sum(value), 0.0),
                    func.count(value),
                ).where(done)
            ).one()
            counts, total, n = row[: len(buckets)], row[-2], row[-1]
            family.add_metric(
                [key] if label else [],
                [*((str(b), c) for b, c in zip(buckets, counts, strict=True)), ("+Inf", n)],
                float(total),
            )
        return family


def queue_depth(celery: Celery, queue: str) -> int | None:
    """Messages waiting in ``queue`` (Redis: the list's ``LLEN``, summed over priorities); None if unreachable."""
    from kombu.exceptions import ChannelError

    try:
        with celery.connection_for_read() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
            try:
                return conn.default_channel.queue_declare(queue=queue, passive=True).message_count
            except ChannelError:  # Redis drops an empty list: no key, no queue yet
                return 0
    except Exception:
        log.warning("queue depth: broker unreachable", exc_info=True)
        return None


def render(sessions: sessionmaker, celery: Celery | None = None) -> Response:
    with sessions() as s:
        counts = dict(s.execute(select(Job.state, func.count()).group_by(Job.state)).tuples().all())
    for state in STATES:
        JOBS.labels(state).set(counts.get(state, 0))
    scraped = CollectorRegistry(auto_describe=False)
    scraped.register(StoreCollector(sessions, celery))
    return Response(generate_latest() + generate_latest(scraped), media_type=CONTENT_TYPE_LATEST)
