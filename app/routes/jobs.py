"""``/v1/jobs``: start a purification, poll it, cancel it, download its artifacts."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Annotated, Any

import anyio.to_thread
from celery import Celery
from clipguard.app import quota, store
from clipguard.app.cleanup import remove_job_files
from clipguard.app.db import Artifact, Dataset, Job, Model, new_id, reader, utcnow
from clipguard.app.deps import CeleryDep, SessionsDep, SettingsDep, TenantDep
from clipguard.app.logs import binds_job
from clipguard.app.metrics import JOBS_CREATED
from clipguard.app.pagination import paginate
from clipguard.app.problems import ProblemError, problem_response
from clipguard.app.queues import GPU_QUEUE, PURIFY_TASK
from clipguard.app.schemas import ArtifactOut, JobCreate, JobOut, JobState, Page
from clipguard.app.storage import storage_for
from fastapi import APIRouter, Header, Request, Response
from fastapi.responses import FileResponse, RedirectResponse
from pydantic import BaseModel
from sqlalchemy import and_, bindparam, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker
from starlette.datastructures import Headers
from starlette.responses import MalformedRangeHeader, RangeNotSatisfiable
from starlette.types import Receive, Scope, Send

from clipguard.methods import Method

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
log = logging.getLogger("clipguard.api")
RETRY_AFTER_S = "2"


def job_out(session: Session, job: Job) -> JobOut:
    # Artifacts are written in the transaction that makes a job succeeded, so a job in any other
    # state has none: its polls (nearly all polls) skip the query.
    artifacts = (
        session.scalars(select(Artifact).where(Artifact.job_id == job.id).order_by(Artifact.name)).all()
        if job.state == "succeeded"
        else []
    )
    return JobOut(
        id=job.id,
        state=job.state,
        stage=job.stage,
        percent=job.percent,
        error=job.error,
        attempts=job.attempts,
        cancel_requested=job.cancel_requested,
        model_id=job.model_id,
        train_data_id=job.train_data_id,
        test_data_id=job.test_data_id,
        params=job.params,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        summary=job.summary,
        artifacts=[
            ArtifactOut(
                name=a.name,
                url=f"/v1/jobs/{job.id}/artifacts/{a.name}",
                sha256=a.sha256,
                size=a.size,
                media_type=a.media_type,
            )
            for a in artifacts
        ],
    )


def _owned_job(session: Session, tenant: str, job_id: str) -> Job:
    job = session.get(Job, job_id)
    if job is None or job.tenant != tenant:
        raise ProblemError(404, f"no job {job_id}", kind="not-found")
    return job


PUBLISH_RETRY = {"max_retries": 2, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5}
"""Enough to reconnect a pooled broker connection after a restart, short enough that a down
broker answers 503 within about a second instead of holding the request."""
BROKER_DOWN_RETRY_AFTER_S = "5"
BROKER_MARK = "clipguard:broker-epoch"


@binds_job  # the route and the sweeper both publish through here: their lines carry the job id
def enqueue(celery: Celery, sessions: sessionmaker, job_id: str) -> bool:
    """Hand a committed job to the broker; False if that failed (the sweeper enqueues it later).

    The message id is written to the row before publishing: a worker drops any delivery whose
    id is not the row's (a message presumed lost that turns up again), see ``store.claim``.
    """
    task_id = new_id()
    if not store.assign_task(sessions, job_id, task_id):
        return True  # no longer queued (claimed or cancelled meanwhile): nothing to publish
    try:
        celery.send_task(
            PURIFY_TASK, args=[job_id], task_id=task_id, queue=GPU_QUEUE, retry=True, retry_policy=PUBLISH_RETRY
        )
    except Exception as exc:
        log.warning("could not enqueue job %s (%s: %s); the sweeper will retry", job_id, type(exc).__name__, exc)
        return False
    store.mark_enqueued(sessions, job_id, task_id)
    log.info("job %s queued as task %s", job_id, task_id)
    return True


def broker_lost_its_queue(celery: Celery) -> bool:
    """True, for one caller, when the broker has lost its data since anyone last looked.

    Redis without persistence comes back from a restart empty, and with it every queued
    message: the job store still says ``queued`` but no worker will ever hear of those jobs.
    A marker key is kept in the broker; finding it gone means the queue went with it. ``SET NX``
    makes exactly one API replica win the re-enqueue. A broker that keeps its data keeps the
    marker, so a restart with AOF triggers nothing. Only Redis transports are checked.
    """
    with celery.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, timeout=2)
        if conn.transport.driver_type != "redis":
            return False
        return bool(conn.default_channel.client.set(BROKER_MARK, new_id(), nx=True))


def reenqueue_lost(celery: Celery, sessions: sessionmaker) -> list[str]:
    """Publish again every queued job whose message the broker lost; returns their ids.

    Run by the sweeper. Raises while the broker is unreachable (the caller logs and retries).
    """
    started = utcnow()
    if not broker_lost_its_queue(celery):
        return []
    ids = store.requeue_published_before(sessions, started)
    for job_id in ids:
        log.warning("the broker lost its queue; re-enqueueing job %s", job_id)
        enqueue(celery, sessions, job_id)
    return ids


def _check_inputs(s: Session, tenant: str, body: JobCreate) -> None:
    model = s.get(Model, body.model_id)
    if model is None or model.tenant != tenant:
        raise ProblemError(404, f"no model {body.model_id}", kind="not-found")
    if model.status == "rejected":
        raise ProblemError(422, f"model {model.id} was rejected: {model.reject_reason}", kind="model-rejected")
    if model.status != "ready":
        raise ProblemError(
            409,
            f"model {model.id} is {model.status}; wait until it is ready",
            kind="model-not-ready",
            headers={"Retry-After": RETRY_AFTER_S},
        )
    for data_id in (body.train_data_id, body.eval.test_data_id if body.eval else None):
        if data_id is None:
            continue
        dataset = s.get(Dataset, data_id)
        if dataset is None or dataset.tenant != tenant:
            raise ProblemError(404, f"no dataset {data_id}", kind="not-found")


def _replay(s: Session, tenant: str, key: str, fingerprint: str) -> Job | None:
    job = s.scalar(select(Job).where(Job.tenant == tenant, Job.idempotency_key == key))
    if job is not None and job.request_hash != fingerprint:
        raise ProblemError(
            422, "Idempotency-Key was already used with a different request body", kind="idempotency-key-reused"
        )
    return job


@router.post(
    "",
    status_code=202,
    response_model=JobOut,
    responses={
        403: {"description": "over the tenant's storage quota"},
        409: {"description": "model not ready yet"},
        422: {"description": "bad request or reused key"},
        503: {"description": "the job queue (broker) is unreachable; retry after Retry-After"},
    },
)
def create_job(
    body: JobCreate,
    response: Response,
    tenant: TenantDep,
    sessions: SessionsDep,
    celery: CeleryDep,
    settings: SettingsDep,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> JobOut:
    """Queue a purification. Retrying with the same ``Idempotency-Key`` and body returns the same job."""
    # Defaults of fields added later (`method`, `bounds_samples`, `resize`, `reactivation_check`) are left out
    # of the fingerprint, so a retry of a request made before they existed still matches the job it created.
    later = {"method"} if body.method == Method.GUARD else set()
    if body.bounds_samples is None:
        later.add("bounds_samples")
    if not body.resize:
        later.add("resize")
    if not body.reactivation_check:
        later.add("reactivation_check")
    request = body.model_dump(mode="json", exclude=later or None)
    fingerprint = hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()
    with sessions() as s:
        job = _replay(s, tenant, idempotency_key, fingerprint) if idempotency_key else None
        if job is None:
            _check_inputs(s, tenant, body)
            quota.room(sessions, settings, tenant)  # its outputs will count: none while the tenant is over
            attack = body.eval.attack if body.eval else None
            if isinstance(attack, BaseModel):  # stored as the engine's record, without the fields left out
                attack = attack.model_dump(mode="json", exclude_none=True)
            job = Job(
                tenant=tenant,
                state="queued",
                model_id=body.model_id,
                train_data_id=body.train_data_id,
                test_data_id=body.eval.test_data_id if body.eval else None,
                params={
                    "method": body.method,
                    "lam": body.lam,
                    "granularity": body.granularity,
                    "attack": attack,
                    **({"bounds_samples": body.bounds_samples} if body.bounds_samples is not None else {}),
                    **({"resize": True} if body.resize else {}),
                    **({"reactivation_check": True} if body.reactivation_check else {}),
                },
                idempotency_key=idempotency_key,
                request_hash=fingerprint,
            )
            s.add(job)
            try:
                s.commit()
            except IntegrityError:  # a concurrent retry with the same key won the insert
                s.rollback()
                job = _replay(s, tenant, idempotency_key or "", fingerprint)
                if job is None:
                    raise
            else:
                if not enqueue(celery, sessions, job.id) and store.discard_unpublished(sessions, job.id):
                    # Status polls keep working from the job store; only new work needs the broker.
                    raise ProblemError(
                        503,
                        "the job queue is unreachable; no job was created, retry later",
                        kind="broker-unavailable",
                        headers={"Retry-After": BROKER_DOWN_RETRY_AFTER_S},
                    )
                JOBS_CREATED.inc()
        response.headers["Location"] = f"/v1/jobs/{job.id}"
        response.headers["Retry-After"] = RETRY_AFTER_S
        return job_out(s, job)


# The read routes open their session inside the route, not through the ``SessionDep`` generator:
# FastAPI closes a generator dependency on another threadpool thread after the route returns, so
# under load (more requests than threadpool threads and pooled connections) the threads waiting
# for a connection starve the closes that would give connections back, and every request waits
# out the pool timeout (30 s). bench/load.py at 64 clients: 1 poll/s before, see docs/lab/benchmarks.md.


def gate_tenant(request: Request) -> str:
    """The tenant ``clipguard.app.auth.Gate`` found for this request's key; 401 if the gate did not run.

    For the status poll, the hottest route: the sync dependency chain behind ``TenantDep``
    costs four threadpool round trips per request, each a scheduler wait on a busy machine,
    and even async dependencies cost more CPU than the rest of the route (see ``get_job``).
    Failing closed keeps the route safe if it is ever mounted where the gate does not run.
    """
    tenant = getattr(request.state, "tenant", None)
    if tenant is None:
        raise ProblemError(
            401,
            "missing or unknown API key; send `Authorization: Bearer <key>`",
            kind="unauthorized",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return tenant


_JOB_FIELDS = [name for name in JobOut.model_fields if name != "artifacts"]
_POLL = (
    select(
        *(Job.__table__.c[name] for name in _JOB_FIELDS),
        Artifact.name.label("a_name"),
        Artifact.sha256.label("a_sha256"),
        Artifact.size.label("a_size"),
        Artifact.media_type.label("a_media_type"),
    )
    .outerjoin(Artifact, and_(Artifact.job_id == Job.id, Job.state == "succeeded"))
    .where(Job.id == bindparam("job_id"), Job.tenant == bindparam("tenant"))
    .order_by(Artifact.name)
)
"""A job and, once it succeeded, its artifacts, in one statement: the job's columns repeat on each artifact row.

Artifacts are written in the transaction that makes a job succeeded, so the join condition on the
state changes nothing but keeps the answer the same as :func:`job_out`'s. Another tenant's job matches
no row, so it answers the same 404 as a job that does not exist."""


def poll_body(rows: Sequence[Mapping[str, Any]]) -> bytes:
    """The ``JobOut`` JSON of :data:`_POLL`'s rows (by column label), serialised without validating again.

    Every value comes from the job store's typed columns, so the model is constructed, not
    validated; FastAPI would validate a returned ``JobOut`` (or dict) once more against the
    ``response_model`` before serialising it. The bytes are pydantic's, as for any other route.
    """
    job = rows[0]
    artifacts = [
        ArtifactOut.model_construct(
            name=r["a_name"],
            url=f"/v1/jobs/{job['id']}/artifacts/{r['a_name']}",
            sha256=r["a_sha256"],
            size=r["a_size"],
            media_type=r["a_media_type"],
        )
        for r in rows
        if r["a_name"] is not None
    ]
    out = JobOut.model_construct(**{name: job[name] for name in _JOB_FIELDS}, artifacts=artifacts)
    return out.model_dump_json().encode()


async def poll_rows(request: Request, job_id: str, tenant: str) -> Sequence[Mapping[str, Any]]:
    """:data:`_POLL`'s rows: on the event loop through psycopg's async pool (PostgreSQL), else one thread hop.

    The async read (``clipguard.app.async_reads``) costs about a quarter of the CPU of SQLAlchemy behind a
    thread. The thread hop, where it remains (SQLite, other drivers), is capped at
    ``Settings.poll_threads`` (``app.state.poll_limiter``, 2 by default): the query is
    sub-millisecond, so a few threads keep up, while more fight the event loop for the GIL and
    stretch the tail (p99 at 64 clients: 140-160 ms with 10 threads, 50-75 ms with 2).
    """
    params = {"job_id": job_id, "tenant": tenant}
    fast = getattr(request.app.state, "async_reader", None)
    if fast is not None:
        return await fast.fetch(_POLL, params)
    engine = reader(request.app.state.sessions)

    def load() -> list[Mapping[str, Any]]:
        with engine.connect() as conn:
            return [row._mapping for row in conn.execute(_POLL, params)]

    return await anyio.to_thread.run_sync(load, limiter=getattr(request.app.state, "poll_limiter", None))


@router.get("/{job_id}", response_model=JobOut, openapi_extra={"security": [{"HTTPBearer": []}]})
async def get_job(job_id: str, request: Request) -> Response:
    """A job's state, stage, progress and, once succeeded, its artifacts: one query (the hot route:
    clients poll it every second or two)."""
    tenant = gate_tenant(request)  # a plain call: FastAPI's dependency machinery was a sixth of the poll's CPU
    rows = await poll_rows(request, job_id, tenant)
    if not rows:
        raise ProblemError(404, f"no job {job_id}", kind="not-found")
    headers = {"Retry-After": RETRY_AFTER_S} if rows[0]["state"] in ("queued", "running") else None
    return Response(poll_body(rows), media_type="application/json", headers=headers)


@router.get("", response_model=Page[JobOut])
def list_jobs(
    tenant: TenantDep,
    sessions: SessionsDep,
    state: JobState | None = None,
    model_id: str | None = None,
    page_size: int = 50,
    page_token: str | None = None,
) -> dict:
    query = select(Job).where(Job.tenant == tenant)
    if state:
        query = query.where(Job.state == state)
    if model_id:
        query = query.where(Job.model_id == model_id)
    with sessions() as session:
        page = paginate(session, query, Job, page_size, page_token)
        page["items"] = [job_out(session, j) for j in page["items"]]
        return page


@router.post(
    "/{job_id}:cancel",
    status_code=202,
    response_model=JobOut,
    responses={409: {"description": "the job already finished"}},
)
def cancel_job(job_id: str, tenant: TenantDep, sessions: SessionsDep, celery: CeleryDep) -> JobOut:
    """Cancel a queued job at once; a running one stops at its next batch (best effort, like AIP-151)."""
    with sessions() as s:
        job = _owned_job(s, tenant, job_id)
        was_queued = job.state == "queued"
        if not store.request_cancel(s, job):
            raise ProblemError(409, f"job {job_id} already {job.state}", kind="job-finished")
        s.commit()
        if was_queued and job.celery_task_id:
            # Skips the message if a worker has not taken it yet. Only an optimisation: the job row
            # already says cancelled and the claim skips it, so a broker without broadcast is fine.
            try:
                celery.control.revoke(job.celery_task_id)
            except Exception:
                log.warning("revoke of job %s failed; the worker will skip it at claim time", job_id, exc_info=True)
        return job_out(s, job)


@router.delete("/{job_id}", status_code=204, responses={409: {"description": "the job is queued or running"}})
def delete_job(job_id: str, tenant: TenantDep, sessions: SessionsDep, settings: SettingsDep) -> Response:
    """Delete a finished job with its artifacts (its files too); a queued or running one must be cancelled first."""
    with sessions.begin() as s:
        job = _owned_job(s, tenant, job_id)
        if job.state not in store.TERMINAL:
            raise ProblemError(409, f"job {job_id} is {job.state}; cancel it first", kind="job-active")
        artifacts = s.scalars(select(Artifact).where(Artifact.job_id == job_id)).all()
        locations = [a.path for a in artifacts]
        for artifact in artifacts:
            s.delete(artifact)
        s.flush()
        s.delete(job)
    remove_job_files(settings, job_id, locations)
    return Response(status_code=204)


@router.get(
    "/{job_id}/artifacts/{name}",
    response_class=FileResponse,
    responses={200: {"content": {"application/octet-stream": {}}}, 304: {"description": "ETag matched"}},
)
def get_artifact(
    job_id: str, name: str, request: Request, tenant: TenantDep, sessions: SessionsDep, settings: SettingsDep
) -> Response:
    """Download an artifact; ``ETag`` is its sha256, ``Range`` and ``If-None-Match`` are honoured.

    With S3 storage the answer is a 302 to a short-lived presigned URL: the bytes do not pass the API."""
    with sessions() as session:
        _owned_job(session, tenant, job_id)
        artifact = session.get(Artifact, (job_id, name))
    if artifact is None:
        raise ProblemError(404, f"job {job_id} has no artifact {name!r}", kind="not-found")
    etag = f'"{artifact.sha256}"'
    if etag_matches(request.headers.get("if-none-match"), etag):
        return Response(status_code=304, headers={"ETag": etag})
    if url := storage_for(settings).download_url(artifact.path, artifact.name, artifact.media_type):
        return RedirectResponse(url, status_code=302, headers={"ETag": etag, "Cache-Control": "no-store"})
    return ArtifactFile(artifact.path, media_type=artifact.media_type, filename=artifact.name, headers={"ETag": etag})


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """``If-None-Match`` against our strong ``etag``: ``*`` matches, and the comparison is weak (RFC 9110
    13.1.2: ``W/"x"`` matches ``"x"``)."""
    if if_none_match is None:
        return False
    tags = [t.strip() for t in if_none_match.split(",")]
    return "*" in tags or etag in (t.removeprefix("W/") for t in tags)


class ArtifactFile(FileResponse):
    """Starlette's file response with RFC 9110's handling of ``Range`` around it.

    A Range it cannot use (another unit such as ``items=0-10``, or a malformed byte range) is
    ignored and the whole file sent with 200, as RFC 9110 14.2 says (Starlette answers 400);
    a byte range past the end is a 416 problem+json with ``Content-Range: bytes */size``.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = Headers(scope=scope)
        wanted = headers.get("range")
        if wanted is not None and scope["method"] in ("GET", "HEAD"):
            size = (await anyio.to_thread.run_sync(os.stat, self.path)).st_size
            try:
                self._parse_range_header(wanted, size)
            except MalformedRangeHeader:
                scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k.lower() != b"range"]}
            except RangeNotSatisfiable:
                response = problem_response(
                    Request(scope),
                    416,
                    f"the range {wanted[:100]!r} starts past the end of the {size}-byte file",
                    kind="range-not-satisfiable",
                    headers={"Content-Range": f"bytes */{size}"},
                )
                await response(scope, receive, send)
                return
        await super().__call__(scope, receive, send)
