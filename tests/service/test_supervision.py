"""``clipguard serve`` as a real process: the request-head bound, readiness that needs a worker, and the
embedded worker: supervised (restarted after kill -9), memory-limited, and killed with its parent.

Each test runs ``python -m clipguard.cli serve`` on a free port over a home of its own (SQLite job
store, SQLite broker: no Redis), and looks at its processes through /proc.
"""

from __future__ import annotations

import io
import json
import os
import select
import signal
import socket
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from clipguard.app.queues import worker_args

from clipguard.remote import Client

from .conftest import free_port, wait_until

CLI = [sys.executable, "-m", "clipguard.cli"]


class Serve:
    """``clipguard serve`` with its own home and port; ``stop`` sends SIGTERM, as an operator would."""

    def __init__(self, home: Path, *args: str, **env: str) -> None:
        self.home, self.args = home, args
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("CLIPGUARD_")}
        self.env.update(
            CLIPGUARD_HOME=str(home),
            CLIPGUARD_DEVICE="cpu",
            CLIPGUARD_HEARTBEAT_S="1",
            CLIPGUARD_RATE_LIMIT_PER_MINUTE="0",
            OMP_NUM_THREADS="2",
            **env,
        )
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log = home / "serve.log"

    def start(self) -> Serve:
        self.home.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [*CLI, "serve", "--port", str(self.port), *self.args],
            env=self.env,
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
        )
        wait_until(lambda: self.answers("/healthz") == 200, 120, "serve to answer")
        return self

    def answers(self, path: str) -> int | None:
        try:
            return httpx.get(self.url + path, timeout=5).status_code
        except httpx.HTTPError:
            return None

    def key(self, tenant: str) -> str:
        return subprocess.run(
            [*CLI, "keys", "create", "--tenant", tenant], env=self.env, capture_output=True, text=True, check=True
        ).stdout.strip()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


@pytest.fixture
def serve(tmp_path) -> Iterator[list[Serve]]:
    """Started services, stopped at the end whatever the test did to them."""
    started: list[Serve] = []
    yield started
    for s in started:
        s.stop()
    for pid in celery_processes(tmp_path):  # never leave a worker behind, even after a failed test
        os.kill(pid, signal.SIGKILL)


def status(pid: int) -> dict[str, str]:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return {}
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


def alive(pid: int) -> bool:
    state = status(pid).get("State", "")
    return bool(state) and not state.startswith("Z")  # a zombie has exited


def celery_processes(home: Path) -> list[int]:
    """Live Celery processes (workers and their pool processes) serving ``home`` or a home below it."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        homes = [e for e in environ if e.startswith(f"CLIPGUARD_HOME={home}".encode())]
        if b"celery" in cmdline and homes and alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def parent(pid: int) -> int:
    return int(status(pid).get("PPid", "0"))


def workers(home: Path) -> list[int]:
    """Celery worker main processes serving ``home``: those whose parent is not a Celery process."""
    celery = celery_processes(home)
    return [pid for pid in celery if parent(pid) not in celery]


def worker_of(s: Serve) -> int | None:
    """``serve``'s embedded worker: the Celery process that is its child."""
    return next((pid for pid in celery_processes(s.home) if parent(pid) == s.proc.pid), None)


def send_head(port: int, size: int) -> tuple[bytes, int]:
    """Send a request whose one header line is ``size`` bytes; returns the answer and how much was sent
    before the server answered."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ")
    chunk, sent = b"a" * (1 << 20), 0
    try:
        while sent < size and not select.select([sock], [], [], 0)[0]:  # stop once an answer waits
            sock.sendall(chunk)
            sent += len(chunk)
        if sent >= size:
            sock.sendall(b"\r\n\r\n")
    except OSError:
        pass
    sock.settimeout(30)
    answer = b""
    try:
        while data := sock.recv(65536):
            answer += data
            if b"\r\n\r\n" in answer and answer.startswith(b"HTTP/1.1 431"):
                break
    except OSError:
        pass
    sock.close()
    return answer, sent


def test_a_huge_request_head_gets_431_and_costs_no_memory(tmp_path, serve):
    """A 150 MiB header line to /healthz was answered 200 and cost the API 200 MB."""
    s = Serve(tmp_path / "home", "--no-worker").start()
    serve.append(s)
    before = int(status(s.proc.pid)["VmHWM"].split()[0])
    answer, sent = send_head(s.port, 64 << 20)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431 ") and b"application/problem+json" in head, answer[:300]
    assert json.loads(body)["type"] == "/problems/header-too-large"
    assert sent < 8 << 20  # answered as soon as the bound was passed, not after reading everything
    assert int(status(s.proc.pid)["VmHWM"].split()[0]) - before < 16 * 1024, "the API buffered the header"
    assert s.answers("/healthz") == 200
    ordinary = httpx.get(s.url + "/healthz", headers={"X-Fine": "a" * 8000})
    assert ordinary.status_code == 200


def test_readiness_needs_a_worker_consuming_the_queue(tmp_path, serve):
    s = Serve(tmp_path / "home", "--no-worker").start()
    serve.append(s)
    r = httpx.get(s.url + "/readyz")
    assert r.status_code == 503 and "no worker is consuming the job queue" in r.json()["detail"]
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", *worker_args("apart@%h")],
        env=s.env,
        stdout=(tmp_path / "worker.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        wait_until(lambda: s.answers("/readyz") == 200, 120, "a worker to be seen")
    finally:
        worker.terminate()
        worker.wait(timeout=60)
    wait_until(lambda: s.answers("/readyz") == 503, 30, "the stopped worker to be noticed")  # it removed its row


def blank_npz(path: Path, images: int) -> Path:
    """``images`` blank 32x32 images as a compressed .npz, written in chunks (never held in memory)."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": (images, 32, 32, 3)})
    labels = io.BytesIO()
    np.save(labels, np.zeros(images, dtype=np.int64))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        with zf.open("x.npy", "w", force_zip64=True) as f:
            f.write(b"\x93NUMPY\x01\x00" + header.getvalue()[8:])
            zeros = bytes(3072 * 1000)
            for _ in range(images // 1000):
                f.write(zeros)
        zf.writestr("y.npy", labels.getvalue())
    return path


def test_the_embedded_worker_is_restarted_memory_limited_and_dies_with_serve(tmp_path, serve, model_file, small_npz):
    home = tmp_path / "home"
    limit = str(int(1.6 * 1024**3))
    s = Serve(home, CLIPGUARD_WORKER_MEMORY_BYTES=limit).start()
    serve.append(s)
    wait_until(lambda: s.answers("/readyz") == 200, 180, "the embedded worker")
    first = worker_of(s)
    assert first is not None

    os.kill(first, signal.SIGKILL)  # jobs then sat queued for ever, and /readyz said ready
    wait_until(lambda: worker_of(s) not in (None, first), 60, "a new worker: " + s.tail())
    second = worker_of(s)
    wait_until(lambda: s.answers("/readyz") == 200, 180, "the restarted worker to be ready")

    bomb = blank_npz(tmp_path / "bomb.npz", 400_000)  # 1.2 GB once decoded, under the 4 GiB decode cap
    with Client(s.url, s.key("solo")) as client:
        model = client.wait_model(client.upload_model(model_file, arch="small_cnn").id)
        heavy = client.submit(model.id, client.add_dataset(str(bomb)).id, lam=3.0)
        light = client.submit(model.id, client.add_dataset(str(small_npz)).id, lam=3.0, method="paper")
        heavy = client.wait(heavy.id, poll_s=0.5, timeout_s=300)
        assert heavy.state == "failed" and heavy.error.startswith("memory limit exceeded in stage load"), heavy
        assert "of 1717986918 bytes" in heavy.error
        light = client.wait(light.id, poll_s=0.5, timeout_s=300)
        assert light.state == "succeeded", (light, s.tail())
    assert worker_of(s) == second  # the same worker ran both: a failed allocation killed nothing

    s.proc.kill()  # kill -9 of serve: its worker must not live on as an orphan
    s.proc.wait()
    wait_until(lambda: not alive(second), 30, "the orphaned worker to die")
    again = Serve(home).start()
    serve.append(again)
    wait_until(lambda: again.answers("/readyz") == 200, 180, "the new serve's worker")
    assert workers(home) == [worker_of(again)]  # one worker, as the setup means
