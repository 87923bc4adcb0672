"""Observability with real parts: JSON logs carrying the job id, /metrics after a real job, Celery task events.

The live tests run their own uvicorn + Celery worker (``CLIPGUARD_LOG_FORMAT=json``) on a fresh
PostgreSQL database and Redis db 13, so the numbers they scrape are this module's jobs only.
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import httpx
import psycopg
import pytest
import redis
from clipguard.app.db import Dataset, Job, Model, make_sessionmaker, utcnow
from clipguard.app.main import create_app
from clipguard.app.metrics import FAILURE_REASONS, OTHER_FAILURE, STAGES, failure_reason
from clipguard.app.queues import GPU_QUEUE, PURIFY_TASK, make_celery
from clipguard.app.settings import Settings
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from clipguard.remote import Client

from .conftest import PG_ADMIN, LiveService, redis_db_url, wait_until

REDIS_URL = redis_db_url(13)
"""Not the shared test db 11: a message left there would be picked up by another module's worker."""


@pytest.fixture(scope="module")
def obs_redis(redis_url) -> Iterator[str]:  # redis_url: starts redis-server when none runs
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    yield REDIS_URL
    client.flushdb()


@pytest.fixture(scope="module")
def obs_pg() -> Iterator[str]:
    name = f"clipguard_obs_{os.getpid()}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def obs_live(tmp_path_factory, obs_pg, obs_redis) -> Iterator[LiveService]:
    service = LiveService(tmp_path_factory.mktemp("obs-home"), obs_pg, obs_redis)
    service.env["CLIPGUARD_LOG_FORMAT"] = "json"
    try:
        service.start()
        yield service
    finally:
        service.stop()


def metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``{(sample name, sorted labels): value}`` from Prometheus text."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


# --- logs ---------------------------------------------------------------------------------------


def test_a_real_job_logs_json_lines_with_its_id_and_shows_up_in_metrics(obs_live, model_file, small_npz):
    with Client(obs_live.url, obs_live.key("acme")) as client:
        model = client.wait_model(client.upload_model(model_file, arch="small_cnn", num_classes=10).id)
        data = client.add_dataset(str(small_npz))
        job = client.submit(model.id, data.id, lam=3.0, test_data_id=data.id, attack="badnets", idempotency_key="obs-1")
        job = client.wait(job.id, poll_s=0.5, timeout_s=240)
    assert job.state == "succeeded", (job, obs_live.log("worker")[-3000:])
    job_id = job.id
    with make_sessionmaker(obs_live.env["CLIPGUARD_DATABASE_URL"], migrate=False)() as s:
        task_id = s.get_one(Job, job_id).celery_task_id

    lines: dict[str, list[dict[str, Any]]] = {}
    for name in ("api", "worker"):
        parsed = []
        for raw in obs_live.log(name).splitlines():
            try:
                parsed.append(json.loads(raw))
            except json.JSONDecodeError:
                # Only the worker's start-up banner (printed, not logged) may be plain text, and it
                # says nothing about a job.
                assert name == "worker" and job_id not in raw and task_id not in raw, raw
        lines[name] = parsed
        assert parsed, f"no JSON lines in the {name} log"

    about_job = [
        line for name in lines for line in lines[name] if job_id in line["message"] or task_id in line["message"]
    ]
    assert about_job
    for line in about_job:
        assert line["job_id"] == job_id, line
        assert {"timestamp", "level", "logger", "message", "process"} <= set(line)

    # The worker: everything from "received" to "succeeded" (engine stages, warnings, Celery's own
    # trace lines, in the main process and the child) carries the job id.
    worker = lines["worker"]
    start = next(
        i for i, line in enumerate(worker) if line["message"].endswith("received") and task_id in line["message"]
    )
    end = next(i for i, line in enumerate(worker) if " succeeded in " in line["message"] and task_id in line["message"])
    span = worker[start : end + 1]
    assert [line for line in span if line["job_id"] != job_id] == []
    assert {f"job {job_id}: stage {stage}" for stage in ("load", "bounds", "export", "evaluate")} <= {
        line["message"] for line in span
    }

    # The API: the publish, the creating POST (bound from its Location) and every poll of the job.
    api = [line for line in lines["api"] if line["job_id"] == job_id]
    assert any(line["message"] == f"job {job_id} queued as task {task_id}" for line in api)
    assert any('"POST /v1/jobs HTTP/1.1" 202' in line["message"] for line in api)
    assert sum(f"GET /v1/jobs/{job_id} " in line["message"] for line in api) >= 2

    # /metrics after the real job: stage durations and bounds throughput come from the worker's
    # report through the job store; the queue has drained.
    seen = metrics(httpx.get(f"{obs_live.url}/metrics").text)
    for stage in ("load", "bounds", "export", "evaluate"):
        assert seen[("clipguard_job_stage_duration_seconds_count", (("stage", stage),))] == 1
        assert seen[("clipguard_job_stage_duration_seconds_sum", (("stage", stage),))] > 0
    assert seen[("clipguard_job_stage_duration_seconds_count", (("stage", "select_lambda"),))] == 0  # fixed λ
    speed = seen[("clipguard_bounds_throughput_images_per_second_sum", ())]
    assert seen[("clipguard_bounds_throughput_images_per_second_count", ())] == 1
    assert speed == pytest.approx(256 / job.summary["timings"]["bounds"])
    assert seen[("clipguard_queue_depth", (("queue", GPU_QUEUE),))] == 0
    assert seen[("clipguard_jobs", (("state", "succeeded"),))] == 1
    assert all(v == 0 for (name, _), v in seen.items() if name == "clipguard_job_failures_total")


# --- Celery events (what Flower reads) --------------------------------------------------------------


def test_a_real_worker_emits_task_events(obs_live):
    celery = make_celery(Settings(home=obs_live.logs.parent, broker_url=obs_live.env["CLIPGUARD_BROKER_URL"]))
    events: list[dict] = []
    ready = threading.Event()
    task_id = uuid.uuid4().hex

    receivers: list[Any] = []

    def listen() -> None:
        with celery.connection() as conn:
            receivers.append(celery.events.Receiver(conn, handlers={"*": events.append}))
            ready.set()
            receivers[0].capture(limit=None, timeout=60, wakeup=True)

    def capture_stopped() -> bool:
        return any(e["type"] == "task-succeeded" and e.get("uuid") == task_id for e in events)

    threading.Thread(target=listen, daemon=True).start()
    assert ready.wait(10)
    try:  # events are a fanout: only what is sent after the receiver subscribed arrives
        wait_until(lambda: any(e["type"] == "worker-heartbeat" for e in events), 30, "a worker heartbeat")
    except AssertionError:
        receivers[0].should_stop = True
        raise
    # A job id the store does not know: the task runs, finds nothing to claim and succeeds at once.
    celery.send_task(PURIFY_TASK, args=[uuid.uuid4().hex], task_id=task_id, queue=GPU_QUEUE)
    try:
        wait_until(capture_stopped, 60, "the worker's task-succeeded event")
    finally:
        receivers[0].should_stop = True
    ours = {e["type"] for e in events if e.get("uuid") == task_id}
    assert {"task-sent", "task-received", "task-started", "task-succeeded"} <= ours


# --- metrics from the store, in process ---------------------------------------------------------

QUIET_REDIS_URL = redis_db_url(15)
"""No worker consumes this db (the live worker of this module watches db 13), so messages stay queued."""


@pytest.fixture
def obs_settings(tmp_path, redis_url) -> Settings:
    settings = Settings(home=tmp_path / "home", broker_url=QUIET_REDIS_URL)
    settings.ensure_dirs()
    return settings


def test_metrics_read_the_store_and_the_broker_at_scrape_time(obs_settings):
    obs_redis = QUIET_REDIS_URL
    sessions = make_sessionmaker(obs_settings.database_url)
    errors = [prefix + " (details)" for _, prefix in FAILURE_REASONS] + ["training data: file not found"]
    with sessions.begin() as s:
        model = Model(tenant="t", arch="small_cnn", num_classes=10, status="ready")
        data = Dataset(tenant="t", kind="path", ref="/d.npz")
        s.add_all([model, data])
        s.flush()
        new = {"tenant": "t", "model_id": model.id, "train_data_id": data.id, "params": {}}
        for seconds in (0.5, 3.0, 40.0):
            s.add(
                Job(
                    **new,
                    state="succeeded",
                    finished_at=utcnow(),
                    summary={
                        "timings": {"load": seconds, "bounds": seconds * 2, "export": 1.0, "total": 99.0},
                        "bounds_images_per_s": 1000 / seconds,
                    },
                )
            )
        s.add(Job(**new, state="succeeded", summary=None))  # a job from before timings were recorded
        s.add_all(Job(**new, state="failed", error=e, finished_at=utcnow() - timedelta(minutes=1)) for e in errors)
    redis.Redis.from_url(obs_redis).delete(GPU_QUEUE)
    with TestClient(create_app(obs_settings)) as client:
        celery = client.app.state.celery
        assert metrics(client.get("/metrics").text)[("clipguard_queue_depth", (("queue", GPU_QUEUE),))] == 0
        for _ in range(2):  # nobody consumes this queue here: the messages wait
            celery.send_task(PURIFY_TASK, args=[uuid.uuid4().hex], queue=GPU_QUEUE)
        seen = metrics(client.get("/metrics").text)
    redis.Redis.from_url(obs_redis).delete(GPU_QUEUE)

    assert seen[("clipguard_queue_depth", (("queue", GPU_QUEUE),))] == 2
    bucket = "clipguard_job_stage_duration_seconds_bucket"
    assert seen[(bucket, (("le", "1.0"), ("stage", "load")))] == 1
    assert seen[(bucket, (("le", "5.0"), ("stage", "load")))] == 2
    assert seen[(bucket, (("le", "+Inf"), ("stage", "load")))] == 3
    assert seen[("clipguard_job_stage_duration_seconds_sum", (("stage", "bounds"),))] == pytest.approx(87.0)
    assert seen[("clipguard_job_stage_duration_seconds_count", (("stage", "select_lambda"),))] == 0
    assert {labels[0][1] for name, labels in seen if name == "clipguard_job_stage_duration_seconds_count"} == set(
        STAGES
    )
    assert seen[("clipguard_bounds_throughput_images_per_second_count", ())] == 3
    assert seen[("clipguard_bounds_throughput_images_per_second_bucket", (("le", "300.0"),))] == 1  # 1000/40
    failures = {labels[0][1]: v for (name, labels), v in seen.items() if name == "clipguard_job_failures_total"}
    expected: dict[str, float] = {}
    for e in errors:
        expected[failure_reason(e)] = expected.get(failure_reason(e), 0) + 1
    assert failures == expected
    assert failures[OTHER_FAILURE] == 1 and failures["worker_lost"] == 2
    assert seen[("clipguard_jobs", (("state", "failed"),))] == len(errors)
