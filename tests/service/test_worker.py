"""The purify task body against the real engine, in process: cancellation and superseded attempts.

A cancelled or superseded attempt must stop at the engine's next cancellation check and
publish nothing; the job row says what happened.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from clipguard.app import store
from clipguard.app.db import Dataset, Job, Model, make_sessionmaker
from clipguard.app.quarantine import quarantine
from clipguard.worker.tasks import run_attempt
from sqlalchemy import update


@pytest.fixture
def job(settings, model_file, small_npz):
    settings.ensure_dirs()
    sessions = make_sessionmaker(settings.database_url)
    verdict = quarantine(
        model_file,
        arch="small_cnn",
        num_classes=10,
        mean=None,
        std=None,
        blobs=settings.blobs_dir,
        tmp=settings.tmp_dir,
        timeout_s=120,
        memory_bytes=8 * 1024**3,
    )
    assert verdict.ok, verdict.reason
    with sessions.begin() as s:
        model = Model(tenant="t", arch="small_cnn", num_classes=10, status="ready", canonical_sha256=verdict.sha256)
        data = Dataset(tenant="t", kind="path", ref=str(small_npz))
        s.add_all([model, data])
        s.flush()
        row = Job(tenant="t", state="queued", model_id=model.id, train_data_id=data.id, params={"lam": 3.0})
        s.add(row)
    return sessions, row.id


def state(sessions, job_id: str) -> Job:
    with sessions() as s:
        return s.get_one(Job, job_id)


def test_a_cancel_request_stops_the_engine_and_publishes_nothing(settings, job):
    sessions, job_id = job
    claim = store.claim(sessions, job_id, max_attempts=3)
    with sessions.begin() as s:  # the user cancels while the attempt is starting
        s.execute(update(Job).where(Job.id == job_id).values(cancel_requested=True))
    run_attempt(sessions, settings, claim)
    assert state(sessions, job_id).state == "cancelled"
    assert not (settings.jobs_dir / job_id / f"attempt-{claim.attempt}").exists()


def test_a_superseded_attempt_stops_and_leaves_the_job_to_the_new_one(settings, job):
    sessions, job_id = job
    old = store.claim(sessions, job_id, max_attempts=3)
    new = store.claim(sessions, job_id, max_attempts=3)  # redelivered: the old worker is presumed dead
    run_attempt(sessions, settings, old)
    row = state(sessions, job_id)
    assert (row.state, row.claim, row.attempts) == ("running", new.token, 2)
    assert not Path(settings.jobs_dir / job_id / "attempt-1").exists()


def test_bad_input_fails_the_job_with_the_engines_message(settings, job):
    sessions, job_id = job
    with sessions.begin() as s:
        data_id = s.get_one(Job, job_id).train_data_id
        s.execute(update(Dataset).where(Dataset.id == data_id).values(ref="/nonexistent/train.npz"))
    run_attempt(sessions, settings, store.claim(sessions, job_id, max_attempts=3))
    row = state(sessions, job_id)
    assert row.state == "failed" and "not found" in row.error


def test_the_engine_runs_on_the_threads_the_worker_setting_allows(settings, job, monkeypatch):
    import torch

    import clipguard.purify
    from clipguard.errors import Cancelled

    seen = []

    def engine(options, **_):
        seen.append(torch.get_num_threads())
        raise Cancelled("enough")

    monkeypatch.setattr(clipguard.purify, "purify", engine)
    monkeypatch.setattr(settings, "threads", "1")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        sessions, job_id = job
        run_attempt(sessions, settings, store.claim(sessions, job_id, max_attempts=3))
    finally:
        torch.set_num_threads(before)
    assert seen == [1] and state(sessions, job_id).state == "cancelled"
