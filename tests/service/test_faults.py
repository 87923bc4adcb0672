"""Faults with the real parts: a worker killed mid-bounds, a full disk, a Redis restart, an API killed mid-upload.

The tests share one service built for breaking: its own uvicorn, Celery worker and redis-server (a free
loopback port, nothing kept on disk) over a PostgreSQL database of its own, and a small tmpfs mounted as
the job folder. Killing or restarting any of them touches nothing else on the machine. Heartbeat,
stale-job and sweep intervals are cut to seconds so the recovery paths run in CI time.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import psycopg
import pytest
import redis
from clipguard.app.queues import worker_args

from .conftest import PG_ADMIN, LiveService, free_port, wait_until

SLOW_IMAGES = 4096
"""Random 32x32 images: a bounds pass of seconds on two cores, long enough to SIGKILL it mid-way."""
FAST = {
    "CLIPGUARD_HEARTBEAT_S": "1",
    "CLIPGUARD_STALE_AFTER_S": "6",
    "CLIPGUARD_SWEEP_EVERY_S": "1",
    "CLIPGUARD_RATE_LIMIT_PER_MINUTE": "0",  # these tests poll hard; the limiter has its own tests
    "CLIPGUARD_MAX_ATTEMPTS": "2",
}
JOBS_TMPFS = "32m"
TERMINAL = ("succeeded", "failed", "cancelled")


class RedisServer:
    """A private, memory-only redis-server: a restart loses every queued message, as in production without AOF."""

    def __init__(self, log: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.log = log
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
            ],
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
        )
        client = redis.Redis.from_url(self.url)

        def up() -> bool:
            try:
                return bool(client.ping())
            except redis.ConnectionError:
                return False

        wait_until(up, 20, "redis-server to answer")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # --save "": nothing is written on the way down
            self.proc.wait(timeout=20)


class FaultyService(LiveService):
    """API and worker processes that a test can kill and start again one at a time."""

    def __init__(self, home: Path, database_url: str, broker_url: str, data_root: Path) -> None:
        super().__init__(home, database_url, broker_url)
        self.env.update(FAST, CLIPGUARD_DATA_ROOTS=f'["{data_root}"]')
        self.home = home
        self.api: subprocess.Popen | None = None
        self.worker: subprocess.Popen | None = None
        self._n = 0

    def start_api(self, **env: str) -> None:
        self._n += 1
        saved, self.env = self.env, {**self.env, **env}
        try:
            self._spawn(
                f"api-{self._n}",
                [
                    sys.executable,
                    "-m",
                    "uvicorn",
                    "--factory",
                    "clipguard.app.main:create_app",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                ],
            )
        finally:
            self.env = saved
        self.api = self.procs[-1]

        def up() -> bool:
            try:
                return httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(up, 60, "the API to answer")

    def start_worker(self, *prefix: str) -> None:
        self._n += 1
        self._spawn(
            f"worker-{self._n}",
            [*prefix, sys.executable, "-m", "celery", *worker_args(f"faults{self._n}@%h")],
        )
        self.worker = self.procs[-1]

    def worker_child(self) -> int:
        """The prefork pool process of the current worker: the one that runs the engine."""
        found: list[int] = []

        def spawned() -> bool:
            found[:] = children(self.worker.pid)
            return len(found) == 1

        wait_until(spawned, 30, "the worker's pool process")
        return found[0]

    def all_logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(self.logs.iterdir()))


def children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)], capture_output=True
        ).returncode
        == 0
    )


@pytest.fixture(scope="module")
def svc(tmp_path_factory, model_file, small_npz) -> Iterator[tuple[FaultyService, httpx.Client, dict]]:
    """The service, a tenant's client, and ids of a ready model, a slow and a small training set."""
    root = tmp_path_factory.mktemp("faults")
    data_root = root / "data"
    data_root.mkdir()
    rng = np.random.default_rng(0)
    np.savez(
        data_root / "slow.npz",
        x=rng.integers(0, 256, (SLOW_IMAGES, 32, 32, 3), dtype=np.uint8),
        y=np.arange(SLOW_IMAGES) % 10,
    )
    shutil.copy(small_npz, data_root / "small.npz")
    db = f"clipguard_faults_{os.getpid()}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{db}"')
    broker = RedisServer(root / "redis.log")
    broker.start()
    home = root / "home"
    tmpfs = mount_tmpfs(home / "jobs", JOBS_TMPFS)
    service = FaultyService(home, f"postgresql+psycopg://postgres@127.0.0.1:5432/{db}", broker.url, data_root)
    service.broker, service.tmpfs = broker, tmpfs  # type: ignore[attr-defined]
    try:
        service.start_api()
        service.start_worker()
        http = httpx.Client(
            base_url=service.url, headers={"Authorization": f"Bearer {service.key('acme')}"}, timeout=30
        )
        model = http.post("/v1/models", data={"arch": "small_cnn"}).json()
        assert http.put(f"/v1/models/{model['id']}/content", content=model_file.read_bytes()).status_code == 202
        wait_until(lambda: http.get(f"/v1/models/{model['id']}").json()["status"] == "ready", 120, "quarantine")
        ids = {"model": model["id"]}
        for name in ("slow", "small"):
            ids[name] = http.post("/v1/datasets", data={"path": str(data_root / f"{name}.npz")}).json()["id"]
        yield service, http, ids
    finally:
        service.stop()
        broker.stop()
        if tmpfs:
            subprocess.run(["umount", "-l", str(home / "jobs")], check=False)
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


JOB = {"lam": 3.0, "method": "paper"}
"""What every job here asks for: the faults are about the service, so no detection pass before the bounds."""


def create(http: httpx.Client, ids: dict, data: str) -> str:
    r = http.post("/v1/jobs", json={"model_id": ids["model"], "train_data_id": ids[data], **JOB})
    assert r.status_code == 202, r.text
    return r.json()["id"]


def wait_job(http: httpx.Client, job_id: str, check, timeout: float, what: str, every: float = 0.2) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = http.get(f"/v1/jobs/{job_id}").json()
        if check(job):
            return job
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}: {job}")


def finished(service: FaultyService, http: httpx.Client, job_id: str, timeout: float = 240) -> dict:
    try:
        return wait_job(http, job_id, lambda j: j["state"] in TERMINAL, timeout, f"job {job_id} to finish")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{service.all_logs()}") from None


def in_bounds(http: httpx.Client, job_id: str, attempt: int) -> None:
    wait_job(
        http,
        job_id,
        lambda j: j["stage"] == "bounds" and j["attempts"] == attempt,
        120,
        f"attempt {attempt} of job {job_id} to reach the bounds pass",
        every=0.05,
    )


def assert_published_only(service: FaultyService, job: dict, attempt: str | None) -> None:
    """The job folder holds exactly the published attempt (or nothing), and every artifact is intact."""
    job_dir = service.home / "jobs" / job["id"]
    left = sorted(p.name for p in job_dir.iterdir()) if job_dir.exists() else []
    assert left == ([attempt] if attempt else []), left
    for artifact in job["artifacts"]:
        data = (job_dir / attempt / artifact["name"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == artifact["sha256"] and len(data) == artifact["size"]


def test_a_worker_killed_mid_bounds_is_redelivered_and_the_job_succeeds(svc):
    service, http, ids = svc
    job_id = create(http, ids, "slow")
    in_bounds(http, job_id, 1)
    # The worker's main process imported the engine before forking the child that runs the job.
    assert "libtorch" in Path(f"/proc/{service.worker.pid}/maps").read_text()
    os.kill(service.worker_child(), signal.SIGKILL)
    job = finished(service, http, job_id)
    assert (job["state"], job["attempts"]) == ("succeeded", 2), job
    assert {a["name"] for a in job["artifacts"]} >= {"purified.pt", "bounds.safetensors", "report.json"}
    assert_published_only(service, job, "attempt-2")
    assert service.worker.poll() is None


def test_a_job_whose_worker_dies_every_time_fails_after_max_attempts(svc):
    service, http, ids = svc
    job_id = create(http, ids, "slow")
    for attempt in (1, 2):  # CLIPGUARD_MAX_ATTEMPTS=2
        in_bounds(http, job_id, attempt)
        os.kill(service.worker_child(), signal.SIGKILL)
    job = finished(service, http, job_id)
    assert job["state"] == "failed" and "gave up after 2 attempts" in job["error"], job
    assert job["artifacts"] == []
    assert_published_only(service, job, None)


def test_a_lost_worker_machine_is_noticed_by_the_sweeper_and_another_worker_finishes(svc):
    """The whole worker (parent and pool) dies: no redelivery from Celery, only the heartbeat stops."""
    service, http, ids = svc
    job_id = create(http, ids, "slow")
    in_bounds(http, job_id, 1)
    child = service.worker_child()
    service.worker.kill()
    os.kill(child, signal.SIGKILL)
    service.worker.wait()
    wait_job(http, job_id, lambda j: j["state"] == "queued", 60, "the sweeper to requeue the silent job")
    service.start_worker()
    job = finished(service, http, job_id)
    assert (job["state"], job["attempts"]) == ("succeeded", 2), job
    assert_published_only(service, job, "attempt-2")


def test_a_full_disk_fails_the_job_cleanly_and_the_worker_carries_on(svc):
    service, http, ids = svc
    jobs_dir = service.home / "jobs"
    filler = jobs_dir / "filler"
    if service.tmpfs:
        st = os.statvfs(jobs_dir)
        room = st.f_bavail * st.f_frsize - 256 * 1024  # leave 256 KiB: purified.pt alone is ~1 MiB
        with filler.open("wb") as f:
            f.truncate(0)
            chunk = b"\0" * 1024 * 1024
            while room > 0:
                f.write(chunk[:room])
                room -= len(chunk)
    else:  # no mount in this sandbox: cap the size of any file the worker writes instead (EFBIG)
        service.worker.terminate()
        service.worker.wait(timeout=30)
        service.start_worker("prlimit", f"--fsize={256 * 1024}", "--")
    try:
        job = finished(service, http, create(http, ids, "small"))
        assert job["state"] == "failed" and job["artifacts"] == [], job
        assert "no space left" in job["error"] and "nothing was published" in job["error"], job["error"]
        assert_published_only(service, job, None)
        assert service.worker.poll() is None
    finally:
        if service.tmpfs:
            filler.unlink()
        else:
            service.worker.terminate()
            service.worker.wait(timeout=30)
            service.start_worker()
    job = finished(service, http, create(http, ids, "small"))  # room again: the same worker takes the next job
    assert job["state"] == "succeeded", job
    assert_published_only(service, job, "attempt-1")


def test_a_redis_restart_loses_no_job_and_enqueue_answers_503_only_while_it_is_down(svc):
    service, http, ids = svc
    running = create(http, ids, "slow")
    queued = [create(http, ids, "small")]
    in_bounds(http, running, 1)
    service.broker.stop()
    try:
        r = http.post("/v1/jobs", json={"model_id": ids["model"], "train_data_id": ids["small"], **JOB})
        assert r.status_code == 503, r.text
        assert r.headers["content-type"] == "application/problem+json" and int(r.headers["retry-after"]) > 0
        assert r.json()["type"] == "/problems/broker-unavailable"
        for job_id in queued:  # polls are answered from the job store
            assert http.get(f"/v1/jobs/{job_id}").json()["state"] == "queued"
        assert http.get(f"/v1/jobs/{running}").status_code == 200
        assert http.get("/readyz").status_code == 503
    finally:
        service.broker.start()  # same port, empty: the queued jobs' messages are gone

    created: list[str] = []

    def accepted() -> bool:
        r = http.post("/v1/jobs", json={"model_id": ids["model"], "train_data_id": ids["small"], **JOB})
        if r.status_code == 202:
            created.append(r.json()["id"])
        return bool(created)

    wait_until(accepted, 30, "job creation to recover")
    for job_id in [running, *queued, *created]:
        job = finished(service, http, job_id)
        assert job["state"] == "succeeded", job
    for job_id in queued:  # re-enqueued once, run once
        assert http.get(f"/v1/jobs/{job_id}").json()["attempts"] == 1


def test_an_api_killed_mid_upload_registers_nothing_corrupt_and_its_part_file_is_cleaned(svc, model_file):
    service, http, _ = svc
    staging = service.home / "tmp"
    model = http.post("/v1/models", data={"arch": "small_cnn"}).json()
    done = next(j for j in http.get("/v1/jobs", params={"state": "succeeded"}).json()["items"])

    def slow_body() -> Iterator[bytes]:
        for _ in range(48):
            yield b"\1" * (1024 * 1024)
            time.sleep(0.05)

    def upload() -> None:
        try:
            httpx.put(
                f"{service.url}/v1/models/{model['id']}/content", content=slow_body(), headers=http.headers, timeout=60
            )
        except httpx.HTTPError:
            pass  # the server died under us: expected

    polls = {"ok": 0, "down": 0}
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            try:
                r = httpx.get(f"{service.url}/v1/jobs/{done['id']}", headers=http.headers, timeout=2)
                assert r.status_code == 200 and r.json()["artifacts"] == done["artifacts"]
                polls["ok"] += 1
            except httpx.HTTPError:
                polls["down"] += 1
            time.sleep(0.1)

    threads = [threading.Thread(target=upload), threading.Thread(target=poll)]
    for t in threads:
        t.start()
    try:
        wait_until(
            lambda: any(p.stat().st_size > 4 * 1024 * 1024 for p in staging.glob("*.part")),
            60,
            "the upload to be half-way",
        )
        service.api.kill()
        service.api.wait()
        parts = list(staging.glob("*.part"))
        assert parts, "the killed upload left no part file to clean"
        ok_before = polls["ok"]
        service.start_api(CLIPGUARD_STAGING_MAX_AGE_S="2")
        wait_until(lambda: not any(p.exists() for p in parts), 30, "the abandoned part file to be removed")
        wait_until(lambda: polls["ok"] > ok_before, 10, "polls to be answered again")
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert polls["down"] > 0 and polls["ok"] > 0
    assert http.get(f"/v1/models/{model['id']}").json()["status"] == "awaiting_upload"  # nothing half-registered
    for blob in (service.home / "blobs").glob("*.upload"):  # content-addressed: a name is the hash of its bytes
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name.removesuffix(".upload")
    r = http.put(f"/v1/models/{model['id']}/content", content=model_file.read_bytes())  # the retry goes through
    assert r.status_code == 202
    wait_until(lambda: http.get(f"/v1/models/{model['id']}").json()["status"] == "ready", 120, "quarantine")
    artifact = done["artifacts"][0]
    body = http.get(artifact["url"]).content
    assert hashlib.sha256(body).hexdigest() == artifact["sha256"]


# ----------------------------------------------------------------------- the same rules, in process (fast)


def test_a_message_presumed_lost_that_turns_up_later_cannot_take_the_job_over(tmp_path):
    from clipguard.app import store
    from clipguard.app.db import make_sessionmaker

    from .test_store import get, new_job

    sessions = make_sessionmaker(f"sqlite:///{tmp_path / 'store.sqlite'}")
    job_id = new_job(sessions)
    assert store.assign_task(sessions, job_id, "first")
    store.mark_enqueued(sessions, job_id, "first")
    assert store.requeue_published_before(sessions, get(sessions, job_id).enqueued_at) == []  # not before itself
    later = get(sessions, job_id).enqueued_at.replace(year=2100)
    assert store.requeue_published_before(sessions, later) == [job_id]  # the broker lost it: publish again
    assert store.requeue_published_before(sessions, later) == []  # one replica takes it
    assert store.assign_task(sessions, job_id, "second")
    assert store.claim(sessions, job_id, max_attempts=3, task_id="first") is None  # the old message: dropped
    claim = store.claim(sessions, job_id, max_attempts=3, task_id="second")
    assert claim is not None and claim.attempt == 1
    again = store.claim(sessions, job_id, max_attempts=3, task_id="second")  # Celery's redelivery: same id
    assert again is not None and again.attempt == 2
    assert not store.assign_task(sessions, job_id, "third")  # running: nothing to publish


def test_a_job_the_broker_refused_is_deleted_unless_a_worker_has_it(tmp_path):
    from clipguard.app import store
    from clipguard.app.db import make_sessionmaker

    from .test_store import new_job

    sessions = make_sessionmaker(f"sqlite:///{tmp_path / 'store.sqlite'}")
    refused, taken = new_job(sessions), new_job(sessions)
    assert store.claim(sessions, taken, max_attempts=3)
    assert store.discard_unpublished(sessions, refused)
    assert not store.discard_unpublished(sessions, taken)


def test_staging_files_are_removed_only_once_abandoned(tmp_path):
    from clipguard.app.main import clean_staging

    old, live = tmp_path / "old.part", tmp_path / "live.part"
    old.write_bytes(b"x")
    live.write_bytes(b"y")
    os.utime(old, (time.time() - 100, time.time() - 100))
    assert clean_staging(tmp_path, max_age_s=60) == 1
    assert not old.exists() and live.exists()
