"""The status poll's read on the event loop (app/async_reads.py) against a real PostgreSQL.

Two promises: the answer is byte for byte what the thread path (SQLAlchemy) gives, and a
database that goes away and comes back costs the client 503s with ``Retry-After``, never a 500
or a hang, and no restart of the API.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import psycopg
import pytest
from clipguard.app import store
from clipguard.app.async_reads import AsyncReader
from clipguard.app.auth import create_key
from clipguard.app.db import make_sessionmaker
from clipguard.app.main import create_app
from clipguard.worker.tasks import run_attempt
from fastapi.testclient import TestClient

from .conftest import PG_ADMIN, wait_until
from .test_api import assert_problem, job_body, settled, upload


@pytest.fixture
def own_db() -> Iterator[str]:
    """A database of this test's own: it is taken offline, which no other test should see."""
    name = f"clipguard_polls_{os.getpid()}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield name
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def both_paths(client: TestClient, path: str, auth: dict) -> tuple:
    """The poll through the async reader, then through the thread hop, on the same app and store."""
    fast = client.get(path, headers=auth)
    reader, client.app.state.async_reader = client.app.state.async_reader, None
    try:
        slow = client.get(path, headers=auth)
    finally:
        client.app.state.async_reader = reader
    return fast, slow


def test_polls_on_the_event_loop_answer_like_the_thread_path_and_outlive_a_database_outage(
    settings, own_db, model_file, small_npz
):
    url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{own_db}"
    config = settings.model_copy(update={"database_url": url, "key_cache_ttl_s": 600.0})
    with TestClient(create_app(config)) as client:
        assert isinstance(client.app.state.async_reader, AsyncReader)
        auth = {"Authorization": f"Bearer {create_key(make_sessionmaker(url), 'acme')}"}
        other = {"Authorization": f"Bearer {create_key(make_sessionmaker(url), 'mallory')}"}
        unseen = {"Authorization": f"Bearer {create_key(make_sessionmaker(url), 'acme')}"}  # first used offline
        model = settled(client, auth, upload(client, auth, model_file, arch="small_cnn")["id"])
        data = client.post("/v1/datasets", headers=auth, files={"file": ("d.npz", small_npz.read_bytes())}).json()
        queued = client.post("/v1/jobs", headers=auth, json=job_body(model, data)).json()
        done = client.post("/v1/jobs", headers=auth, json=job_body(model, data, lam=4.0)).json()
        sessions = make_sessionmaker(url, migrate=False)
        run_attempt(sessions, config, store.claim(sessions, done["id"], max_attempts=3))

        fast, slow = both_paths(client, f"/v1/jobs/{done['id']}", auth)
        assert fast.status_code == slow.status_code == 200 and fast.content == slow.content
        body = fast.json()
        assert body["state"] == "succeeded" and len(body["artifacts"]) >= 3
        assert body["created_at"].endswith(("Z", "+00:00"))  # UTCDateTime's result processor ran
        fast, slow = both_paths(client, f"/v1/jobs/{queued['id']}", auth)
        assert fast.content == slow.content and fast.headers["retry-after"] == slow.headers["retry-after"]
        assert fast.json()["params"]["lam"] == 3.0  # JSON columns decoded as SQLAlchemy decodes them
        assert_problem(client.get(f"/v1/jobs/{done['id']}", headers=other), 404)  # another tenant's job

        # The database goes away: every pooled connection is cut and no new one is allowed.
        with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
            admin.execute(f'ALTER DATABASE "{own_db}" ALLOW_CONNECTIONS false')
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (own_db,))
            try:
                down = assert_problem(client.get(f"/v1/jobs/{done['id']}", headers=auth), 503)
                assert down["type"] == "/problems/store-unavailable" and "job store unavailable" in down["detail"]
                listed = client.get("/v1/jobs", headers=auth)  # a route on SQLAlchemy's pool: the same answer
                assert assert_problem(listed, 503)["type"] == "/problems/store-unavailable"
                assert listed.headers["retry-after"]
                gated = client.get(f"/v1/jobs/{done['id']}", headers=unseen)  # the key lookup itself cannot run
                assert assert_problem(gated, 503)["type"] == "/problems/store-unavailable"
            finally:
                admin.execute(f'ALTER DATABASE "{own_db}" ALLOW_CONNECTIONS true')
        wait_until(
            lambda: client.get(f"/v1/jobs/{done['id']}", headers=auth).status_code == 200,
            30,
            "polls to recover without a restart",
        )
        assert client.get(f"/v1/jobs/{done['id']}", headers=auth).json() == body
