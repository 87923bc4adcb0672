"""Real parts for the service tests: Redis db 11 on 127.0.0.1:6379 (or $CLIPGUARD_TEST_REDIS_PORT), a
throw-away PostgreSQL database on 127.0.0.1:5432, SQLite files under tmp, and, where a test is about them, a real
uvicorn server and a real Celery worker started as subprocesses on free loopback ports.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
import redis
import torch
from clipguard.app.auth import create_key
from clipguard.app.db import make_sessionmaker
from clipguard.app.main import create_app
from clipguard.app.queues import worker_args
from clipguard.app.settings import Settings
from fastapi.testclient import TestClient

from clipguard.data import load_data, save_npz

REDIS_PORT = int(os.environ.get("CLIPGUARD_TEST_REDIS_PORT", "6379"))
"""Another port lets two test runs on one machine (two checkouts) keep out of each other's databases."""
REDIS_DB = 11


def redis_db_url(db: int) -> str:
    """A Redis database of the test server (each module that needs its own queue picks a number)."""
    return f"redis://127.0.0.1:{REDIS_PORT}/{db}"


REDIS_URL = redis_db_url(REDIS_DB)
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
CIFAR10 = Path(
    os.environ.get(
        "CLIPGUARD_CIFAR10", Path(__file__).resolve().parents[3] / "shared" / "datasets" / "cifar10-jpg.tar.gz"
    )
)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.ConnectionError:
        subprocess.run(
            [
                "redis-server",
                "--daemonize",
                "yes",
                "--bind",
                "127.0.0.1",
                "--port",
                str(REDIS_PORT),
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            check=True,
        )
        for _ in range(50):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.1)
    client.flushdb()
    yield REDIS_URL
    client.flushdb()  # only our db number


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    name = f"clipguard_test_{os.getpid()}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def cifar10() -> Path:
    assert CIFAR10.is_file(), f"CIFAR-10 archive not found at {CIFAR10}; set CLIPGUARD_CIFAR10"
    return CIFAR10


@pytest.fixture(scope="session")
def small_npz(tmp_path_factory, cifar10, data_cache) -> Path:
    """256 real CIFAR-10 test images from all ten classes as .npz (decoded once per session).

    The archive is sorted by class, hence the stride: the first 256 would all be airplanes.
    """
    root = tmp_path_factory.mktemp("cifar")
    data = load_data(f"{cifar10}#test", cache_dir=data_cache)  # the session's decoded archive
    return save_npz(data.subset(torch.arange(0, len(data), len(data) // 256)[:256]), root / "small.npz")


@pytest.fixture
def settings(tmp_path, redis_url) -> Settings:
    root = tmp_path / "data-root"
    root.mkdir()
    return Settings(
        home=tmp_path / "home",
        broker_url=redis_url,
        max_upload_bytes=4 * 1024 * 1024,
        data_roots=[root],
        datasets={"tiny": str(root / "tiny.npz")},
    )


@pytest.fixture
def client(settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.fixture
def key_for(settings) -> Callable[[str], dict[str, str]]:
    """Headers with a new API key for a tenant of the in-process app."""
    sessions = make_sessionmaker(settings.database_url)
    return lambda tenant: {"Authorization": f"Bearer {create_key(sessions, tenant)}"}


@pytest.fixture
def auth(key_for) -> dict[str, str]:
    return key_for("acme")


@pytest.fixture
def wait() -> Callable[[Callable[[], bool], float, str], None]:
    return wait_until


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


class LiveService:
    """A uvicorn API process and a Celery worker process sharing one home, database and broker."""

    MAX_UPLOAD = 64 * 1024 * 1024

    def __init__(self, home: Path, database_url: str, broker_url: str) -> None:
        self.env = {
            **os.environ,
            "CLIPGUARD_HOME": str(home),
            "CLIPGUARD_DATABASE_URL": database_url,
            "CLIPGUARD_BROKER_URL": broker_url,
            "CLIPGUARD_DEVICE": "cpu",
            "OMP_NUM_THREADS": "2",
            "CLIPGUARD_MAX_UPLOAD_BYTES": str(self.MAX_UPLOAD),
        }
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.logs = home / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.procs: list[subprocess.Popen] = []

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = (self.logs / f"{name}.log").open("wb")
        self.procs.append(subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT))

    def start(self) -> None:
        self._spawn(
            "api",
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
        self._spawn(
            "worker",
            [sys.executable, "-m", "celery", *worker_args("test@%h")],
        )

        def ready() -> bool:
            try:
                return httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, 60, "the API to be ready")

    def key(self, tenant: str) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "clipguard.cli", "keys", "create", "--tenant", tenant],
            env=self.env,
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.strip()

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def peak_rss_kib(self) -> int:
        """The API process's high-water mark of resident memory (VmHWM)."""
        status = Path(f"/proc/{self.procs[0].pid}/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1])

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")


@pytest.fixture(scope="module")
def live(tmp_path_factory, pg_url, redis_url) -> Iterator[LiveService]:
    """The production topology on loopback: PostgreSQL job store, Redis broker, separate processes."""
    redis.Redis.from_url(redis_url).flushdb()  # no messages left over from in-process tests
    service = LiveService(tmp_path_factory.mktemp("live-home"), pg_url, redis_url)
    try:
        service.start()
        yield service
    finally:
        service.stop()
