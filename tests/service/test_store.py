"""The job store's transitions on SQLite and on PostgreSQL: claims, attempts, stale jobs, cancel."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest
from clipguard.app import store
from clipguard.app.db import Artifact, Dataset, Job, Model, make_sessionmaker, utcnow
from sqlalchemy.orm import sessionmaker


@pytest.fixture(params=["sqlite", "postgresql"])
def sessions(request, tmp_path) -> Iterator[sessionmaker]:
    if request.param == "sqlite":
        yield make_sessionmaker(f"sqlite:///{tmp_path / 'store.sqlite'}")
        return
    sessions = make_sessionmaker(request.getfixturevalue("pg_url"))
    yield sessions
    with sessions.begin() as s:  # the database lives for the session; leave it empty for the next test
        for table in (Artifact, Job, Dataset, Model):
            s.query(table).delete()


def new_job(sessions: sessionmaker, **fields) -> str:
    with sessions.begin() as s:
        model = Model(tenant="t", arch="small_cnn", num_classes=10, status="ready")
        data = Dataset(tenant="t", kind="path", ref="/d")
        s.add_all([model, data])
        s.flush()
        job = Job(tenant="t", state="queued", model_id=model.id, train_data_id=data.id, params={}, **fields)
        s.add(job)
    return job.id


def get(sessions: sessionmaker, job_id: str) -> Job:
    with sessions() as s:
        return s.get_one(Job, job_id)


def test_a_job_is_claimed_once_and_counts_its_attempt(sessions):
    job_id = new_job(sessions)
    first = store.claim(sessions, job_id, max_attempts=3)
    assert first is not None and first.attempt == 1
    assert get(sessions, job_id).state == "running"
    assert store.report_progress(sessions, first, "bounds", 42.0)
    job = get(sessions, job_id)
    assert (job.stage, job.percent) == ("bounds", 42.0)


def test_a_redelivered_job_takes_over_and_the_old_attempt_is_ignored(sessions):
    job_id = new_job(sessions)
    old = store.claim(sessions, job_id, max_attempts=3)
    new = store.claim(sessions, job_id, max_attempts=3)  # the broker redelivered after a worker loss
    assert new is not None and new.attempt == 2
    assert not store.report_progress(sessions, old, "bounds", 10.0)
    assert store.cancel_requested(sessions, old)  # the old attempt is told to stop
    assert not store.succeed(sessions, old, [], {})
    assert store.succeed(
        sessions,
        new,
        [
            Artifact(
                job_id=job_id, name="report.json", path="/x", sha256="0" * 64, size=1, media_type="application/json"
            )
        ],
        {"lam": 3.0},
    )
    job = get(sessions, job_id)
    assert (job.state, job.attempts, job.summary) == ("succeeded", 2, {"lam": 3.0})
    assert store.claim(sessions, job_id, max_attempts=3) is None  # finished jobs are never rerun


def test_the_attempt_cap_fails_the_job_with_a_reason(sessions):
    job_id = new_job(sessions)
    for _ in range(2):
        assert store.claim(sessions, job_id, max_attempts=2) is not None
    assert store.claim(sessions, job_id, max_attempts=2) is None
    job = get(sessions, job_id)
    assert job.state == "failed" and "2 attempts" in job.error


def test_stale_running_jobs_are_requeued_then_failed(sessions):
    job_id = new_job(sessions)
    assert store.claim(sessions, job_id, max_attempts=2)
    later = utcnow() + timedelta(minutes=10)
    assert store.sweep(sessions, stale_after=timedelta(minutes=2), max_attempts=2, now=later) == [job_id]
    assert get(sessions, job_id).state == "queued"
    store.mark_enqueued(sessions, job_id, "task-2")
    assert store.claim(sessions, job_id, max_attempts=2)
    assert store.sweep(sessions, stale_after=timedelta(minutes=2), max_attempts=2, now=later) == []
    job = get(sessions, job_id)
    assert job.state == "failed" and job.error.startswith("worker lost")


def test_a_fresh_heartbeat_keeps_a_job_running(sessions):
    job_id = new_job(sessions)
    claim = store.claim(sessions, job_id, max_attempts=2)
    assert store.report_progress(sessions, claim)
    assert store.sweep(sessions, stale_after=timedelta(minutes=2), max_attempts=2) == []
    assert get(sessions, job_id).state == "running"


def test_jobs_never_handed_to_the_broker_are_enqueued_by_the_sweeper(sessions):
    job_id = new_job(sessions)
    later = utcnow() + timedelta(minutes=10)
    assert store.sweep(sessions, stale_after=timedelta(minutes=2), max_attempts=2, now=later) == [job_id]


def test_cancel_stops_a_queued_job_at_once_and_a_running_one_at_its_next_check(sessions):
    queued, running = new_job(sessions), new_job(sessions)
    claim = store.claim(sessions, running, max_attempts=2)
    with sessions.begin() as s:
        assert store.request_cancel(s, s.get_one(Job, queued))
        assert store.request_cancel(s, s.get_one(Job, running))
    assert get(sessions, queued).state == "cancelled"
    assert store.claim(sessions, queued, max_attempts=2) is None
    assert store.cancel_requested(sessions, claim)
    assert store.finish(sessions, claim, "cancelled")
    assert get(sessions, running).state == "cancelled"


def test_the_migrations_build_exactly_the_models_schema(sessions):
    from alembic import command
    from clipguard.app.migrate import alembic_config

    url = sessions.kw["bind"].url.render_as_string(hide_password=False)
    command.check(alembic_config(url))  # raises when autogenerate would find a difference
