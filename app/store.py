"""Job state transitions, shared by the API, the worker and the sweeper.

Every transition is one conditional ``UPDATE`` so concurrent API replicas, workers and
redelivered messages cannot race each other into an impossible state. A job attempt owns
the row through its ``claim`` token: once a newer attempt has claimed the job, the older
one's progress and result writes match no row and are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from clipguard.app.db import Artifact, Job, new_id, utcnow
from sqlalchemy import and_, delete, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

TERMINAL = ("succeeded", "failed", "cancelled")


@dataclass(frozen=True)
class Claim:
    job_id: str
    token: str
    attempt: int


def claim(sessions: sessionmaker, job_id: str, max_attempts: int, task_id: str | None = None) -> Claim | None:
    """Take ownership of a queued job (or of a running one whose worker died) for one attempt.

    Returns None when there is nothing to run: the job is finished, cancelled, or has just
    been failed because this delivery would exceed ``max_attempts`` (the bound on Celery's
    ``task_reject_on_worker_lost`` redelivery loops). The write is conditional on the
    attempt count read, so of two concurrent deliveries exactly one wins (on SQLite too).

    ``task_id`` is the delivered message's id. A job is re-published under a new id when the
    sweeper finds its message lost (worker gone, broker restarted); a message that was only
    presumed lost and turns up later is then stale and must not take the job over from the
    attempt the new message started. Celery's own redelivery after a worker loss keeps the id.
    """
    with sessions() as s:
        job = s.get(Job, job_id)
        if job is None or job.state in TERMINAL:
            return None
        if task_id is not None and job.celery_task_id is not None and job.celery_task_id != task_id:
            return None
        now, seen = utcnow(), job.attempts  # the ORM update below refreshes `job`, so keep what was read
        same = and_(Job.id == job_id, Job.attempts == seen, Job.state.in_(("queued", "running")))
        if job.cancel_requested:
            s.execute(update(Job).where(same).values(state="cancelled", finished_at=now, stage=None))
            s.commit()
            return None
        if seen >= max_attempts:  # the last attempt's transient fault if it left one, else a lost worker
            why = f"the last one: {job.error}" if job.error else "the worker running this job was lost each time"
            s.execute(
                update(Job)
                .where(same)
                .values(state="failed", finished_at=now, error=f"gave up after {seen} attempts; {why}")
            )
            s.commit()
            return None
        token = new_id()
        won = (
            s.execute(
                update(Job)
                .where(same)
                .values(
                    attempts=seen + 1,
                    claim=token,
                    state="running",
                    stage="starting",
                    percent=0.0,
                    error=None,
                    started_at=job.started_at or now,
                    heartbeat_at=now,
                )
            ).rowcount
            == 1
        )
        s.commit()
        return Claim(job_id, token, seen + 1) if won else None


def _owned(c: Claim) -> object:
    return and_(Job.id == c.job_id, Job.claim == c.token, Job.state == "running")


def report_progress(sessions: sessionmaker, c: Claim, stage: str | None = None, percent: float | None = None) -> bool:
    """Record progress (or just a heartbeat); False when this attempt no longer owns the job."""
    values: dict[str, object] = {"heartbeat_at": utcnow()}
    if stage is not None:
        values.update(stage=stage, percent=percent)
    with sessions.begin() as s:
        return s.execute(update(Job).where(_owned(c)).values(**values)).rowcount == 1


def cancel_requested(sessions: sessionmaker, c: Claim) -> bool:
    """True when the job was cancelled, or taken over by another attempt: either way, stop."""
    with sessions() as s:
        row = s.execute(select(Job.cancel_requested, Job.claim, Job.state).where(Job.id == c.job_id)).one_or_none()
    return row is None or row.cancel_requested or row.claim != c.token or row.state != "running"


def succeed(sessions: sessionmaker, c: Claim, artifacts: list[Artifact], summary: dict) -> bool:
    """Publish the artifacts and the final state in one transaction."""
    with sessions.begin() as s:
        done = (
            s.execute(
                update(Job)
                .where(_owned(c))
                .values(
                    state="succeeded",
                    stage="done",
                    percent=100.0,
                    finished_at=utcnow(),
                    summary=summary,
                    error=None,
                )
            ).rowcount
            == 1
        )
        if done:
            for old in s.scalars(select(Artifact).where(Artifact.job_id == c.job_id)):
                s.delete(old)
            s.flush()
            s.add_all(artifacts)
        return done


def finish(sessions: sessionmaker, c: Claim, state: str, error: str | None = None) -> bool:
    """End an attempt as ``failed`` (with a one-line reason) or ``cancelled``."""
    with sessions.begin() as s:
        return (
            s.execute(
                update(Job)
                .where(_owned(c))
                .values(
                    state=state,
                    error=error,
                    finished_at=utcnow(),
                )
            ).rowcount
            == 1
        )


def release(sessions: sessionmaker, c: Claim, reason: str | None = None) -> None:
    """Hand the job back to the queue (transient fault); the attempt still counts.

    ``reason`` stays in the job's ``error`` while it waits (clients see why it went back), and
    becomes the reason given if the attempts run out; a success clears it.
    """
    with sessions.begin() as s:
        s.execute(update(Job).where(_owned(c)).values(state="queued", claim=None, stage=None, error=reason))


def request_cancel(s: Session, job: Job) -> bool:
    """Cancel a queued job at once or flag a running one; False when it had already finished."""
    if job.state in TERMINAL:
        return job.state == "cancelled"
    job.cancel_requested = True
    if job.state == "queued":
        job.state, job.finished_at = "cancelled", utcnow()
    return True


def sweep(
    sessions: sessionmaker,
    *,
    stale_after: timedelta,
    max_attempts: int,
    now: datetime | None = None,
) -> list[str]:
    """Find jobs that would otherwise be stuck and return the ids that must be (re-)enqueued.

    - ``running`` with a heartbeat older than ``stale_after``: its worker died without the
      broker redelivering (or the redelivery was dropped). Requeued, or failed with a clear
      reason once ``max_attempts`` is reached.
    - ``queued`` and never handed to the broker (``enqueued_at`` empty) for ``stale_after``:
      the API crashed between commit and publish.
    """
    now = now or utcnow()
    cutoff = now - stale_after
    requeue: list[str] = []
    with sessions() as s:
        stale = s.scalars(
            select(Job).where(
                or_(
                    and_(Job.state == "running", Job.heartbeat_at < cutoff),
                    and_(Job.state == "queued", Job.enqueued_at.is_(None), Job.created_at < cutoff),
                )
            )
        ).all()
        for job in stale:
            # Conditional on what was read: a job that moved meanwhile (heartbeat, claim) is left alone.
            beat = Job.heartbeat_at.is_(None) if job.heartbeat_at is None else Job.heartbeat_at == job.heartbeat_at
            same = and_(Job.id == job.id, Job.state == job.state, Job.attempts == job.attempts, beat)
            if job.state == "running" and job.attempts >= max_attempts:
                silence = int(stale_after.total_seconds())
                values: dict = {
                    "state": "failed",
                    "finished_at": now,
                    "error": (f"worker lost: no heartbeat for {silence} s after {job.attempts} attempts"),
                }
            elif job.cancel_requested:
                values = {"state": "cancelled", "finished_at": now}
            else:
                values = {"state": "queued", "claim": None, "stage": None, "enqueued_at": None}
            if s.execute(update(Job).where(same).values(**values)).rowcount == 1 and values["state"] == "queued":
                requeue.append(job.id)
        s.commit()
    return requeue


def assign_task(sessions: sessionmaker, job_id: str, task_id: str) -> bool:
    """Record the id of the message about to be published, before publishing it.

    Written first so a worker that receives the message at once already finds its id on the
    row (see :func:`claim`). False when the job is no longer queued: nothing to publish.
    """
    with sessions.begin() as s:
        return (
            s.execute(
                update(Job).where(Job.id == job_id, Job.state == "queued").values(celery_task_id=task_id)
            ).rowcount
            == 1
        )


def mark_enqueued(sessions: sessionmaker, job_id: str, task_id: str) -> None:
    with sessions.begin() as s:
        s.execute(update(Job).where(Job.id == job_id).values(enqueued_at=utcnow(), celery_task_id=task_id))


def discard_unpublished(sessions: sessionmaker, job_id: str) -> bool:
    """Delete a job the broker refused before any worker saw it, so a 503 means "not created".

    Conditional on the job still being queued and never marked enqueued: if a publish that
    reported failure did reach a worker, the job is running and stays.
    """
    with sessions.begin() as s:
        return (
            s.execute(delete(Job).where(Job.id == job_id, Job.state == "queued", Job.enqueued_at.is_(None))).rowcount
            == 1
        )


def requeue_published_before(sessions: sessionmaker, before: datetime) -> list[str]:
    """Queued jobs published before ``before``, taken back for re-publishing: the broker lost its queue.

    Called when the broker is found to have lost its data (a Redis restart without
    persistence). Each job is marked unpublished with a conditional update, so of several API
    replicas noticing the same loss one takes it, and a job claimed meanwhile is left alone.
    """
    with sessions() as s:
        rows = s.execute(
            select(Job.id, Job.enqueued_at).where(
                Job.state == "queued", Job.enqueued_at.is_not(None), Job.enqueued_at < before
            )
        ).all()
        taken = [
            row.id
            for row in rows
            if s.execute(
                update(Job)
                .where(Job.id == row.id, Job.state == "queued", Job.enqueued_at == row.enqueued_at)
                .values(enqueued_at=None)
            ).rowcount
            == 1
        ]
        s.commit()
    return taken
