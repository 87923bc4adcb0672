"""The FastAPI application: routers, problem+json errors, metrics, and the stuck-job sweeper."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import anyio
import anyio.to_thread
from clipguard.app import auth, cleanup, logs, metrics, openapi, presence, problems, ratelimit, storage, store, ui
from clipguard.app.async_reads import AsyncReader
from clipguard.app.db import Model, make_sessionmaker
from clipguard.app.quarantine import QuarantineQueue
from clipguard.app.queues import make_celery
from clipguard.app.routes import datasets, health, jobs, models
from clipguard.app.settings import Settings, get_settings
from fastapi import FastAPI
from sqlalchemy import select

log = logging.getLogger("clipguard.api")
MULTIPART_OVERHEAD = 1024 * 1024
"""Room above the upload cap for multipart boundaries and form fields."""
QUARANTINE_SHUTDOWN_WAIT_S = 10.0
"""How long a stopping API waits for the checkpoint checks it is running (the rest are resumed at the next start)."""
WORKER_ROW_TTL_S = 86400.0
"""A worker silent this long is forgotten (its row only ever told readiness it was gone)."""


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    settings.ensure_dirs()

    logs.configure(settings.log_format)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        logs.configure(settings.log_format)  # again: uvicorn set up its own loggers after create_app ran
        app.state.settings = settings
        app.state.sessions = make_sessionmaker(settings.database_url)
        app.state.key_cache = auth.KeyCache(settings.key_cache_ttl_s)
        app.state.poll_limiter = anyio.CapacityLimiter(settings.poll_threads)  # see clipguard.app.routes.jobs.get_job
        app.state.async_reader = (
            AsyncReader.for_engine(app.state.sessions.kw["bind"], settings.poll_threads)
            if settings.poll_reader == "async"
            else None
        )
        if app.state.async_reader is not None:
            await app.state.async_reader.open()
        app.state.celery = make_celery(settings)
        app.state.ratelimiter = ratelimit.RateLimiter(
            settings.rate_limit_per_minute, ratelimit.storage_url(settings.ratelimit_url, settings.broker_url)
        )
        app.state.quarantine = QuarantineQueue(settings.quarantine_concurrency, settings.quarantine_queue_per_tenant)
        _resume_quarantine(app)
        sweeper = asyncio.create_task(_sweep_forever(app))
        try:
            yield
        finally:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
            await anyio.to_thread.run_sync(app.state.quarantine.close, QUARANTINE_SHUTDOWN_WAIT_S)
            if app.state.async_reader is not None:
                await app.state.async_reader.close()

    app = FastAPI(
        title="clipguard",
        version="1",
        lifespan=lifespan,
        description="Upload suspect image classifiers, purify them, download the results.",
    )
    problems.install(app)
    storage.install(app)  # object-storage failures: 503/502 as problem+json
    app.add_middleware(auth.Gate)  # key and rate limit checked before any body is read
    app.add_middleware(problems.RequestGuard)
    app.add_middleware(problems.BodyLimit, limit=settings.max_upload_bytes + MULTIPART_OVERHEAD)
    app.add_middleware(metrics.Observe)
    app.add_middleware(logs.JobContext)  # outermost: uvicorn's access line for a job carries its id
    for router in (models.router, datasets.router, jobs.router, health.router):
        app.include_router(router)
    openapi.install(app)
    ui.install(app)  # last: its middleware, outermost, turns a console request into a /v1 one before the gate
    return app


def _resume_quarantine(app: FastAPI) -> None:
    """Models left ``validating`` by a restart are checked again (the check is deterministic)."""
    settings: Settings = app.state.settings
    with app.state.sessions() as s:
        pending = s.scalars(select(Model).where(Model.status == "validating")).all()
    for model in pending:
        upload = settings.blobs_dir / f"{model.upload_sha256}.upload"
        app.state.quarantine.submit(
            model.tenant,
            functools.partial(models.run_quarantine, app.state.sessions, settings, model.id, upload),
            reserved=False,
        )


async def _sweep_forever(app: FastAPI) -> None:
    """Requeue or fail jobs whose worker died, and enqueue jobs the API failed to publish."""
    settings: Settings = app.state.settings
    while True:
        try:
            ids = await anyio.to_thread.run_sync(
                lambda: store.sweep(
                    app.state.sessions,
                    stale_after=timedelta(seconds=settings.stale_after_s),
                    max_attempts=settings.max_attempts,
                )
            )
            for job_id in ids:
                log.warning("re-enqueueing stuck job %s", job_id)
                await anyio.to_thread.run_sync(jobs.enqueue, app.state.celery, app.state.sessions, job_id)
        except Exception:
            log.exception("sweep failed; trying again later")
        try:  # apart from the store sweep: while the broker is down, stuck jobs are still found and failed
            await anyio.to_thread.run_sync(jobs.reenqueue_lost, app.state.celery, app.state.sessions)
        except Exception as exc:
            log.warning("broker check failed (%s: %s); trying again later", type(exc).__name__, exc)
        try:
            await anyio.to_thread.run_sync(clean_staging, settings.tmp_dir, settings.staging_max_age_s)
        except OSError:
            log.exception("cleaning the upload staging folder failed; trying again later")
        try:
            await anyio.to_thread.run_sync(cleanup.collect_blobs, app.state.sessions, settings)
            await anyio.to_thread.run_sync(presence.forget_stale, app.state.sessions, WORKER_ROW_TTL_S)
        except Exception:
            log.exception("removing unused blobs or stale worker rows failed; trying again later")
        await asyncio.sleep(settings.sweep_every_s)


def clean_staging(tmp: Path, max_age_s: float) -> int:
    """Delete staging files (upload parts, quarantine output) untouched for ``max_age_s``; returns the count.

    What a killed API leaves behind: an upload in progress writes its part file continually,
    so age since the last write tells an abandoned file from a live one, also when several API
    replicas share the folder. Never a blob: those are only ever renamed out of ``tmp``.
    """
    cutoff, removed = time.time() - max_age_s, 0
    for path in tmp.iterdir():
        try:
            if path.is_file() and path.stat().st_mtime < cutoff:
                path.unlink()
                removed += 1
        except FileNotFoundError:  # finished (renamed) or removed by another replica meanwhile
            continue
    if removed:
        log.warning("removed %d abandoned staging file(s) from %s", removed, tmp)
    return removed
