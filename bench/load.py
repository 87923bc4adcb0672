"""Service load on loopback: job status polls and job creation at rising concurrency, and one big upload.

Starts everything it measures and throws it away afterwards: a redis-server of its own (free port, nothing
on disk), a throw-away PostgreSQL database on 127.0.0.1:5432, a temporary ``CLIPGUARD_HOME`` and a real
uvicorn serving ``clipguard.app.main:create_app``. No Celery worker: created jobs stay queued, which is what a
status poll of a busy service sees. Bounded in time and count; nothing leaves the machine.

    python bench/load.py                                  # 1, 8, 32, 64 clients, 8 s each, 500 MB upload
    python bench/load.py --clients 64 --seconds 5 --upload-mb 0 --uvicorn-workers 2
    python bench/load.py --http h11 --loop asyncio         # uvicorn's pure-Python HTTP parser and event loop
    python bench/load.py --poll-reader thread              # the status poll through SQLAlchemy in a thread

The load generator is a minimal asyncio HTTP/1.1 keep-alive client (one connection per client, no
pipelining), far cheaper per request than httpx, so on a small machine most CPU goes to the server.
It still shares the cores with the server: the figures are a floor for the server alone. The per-key
rate limit is turned off (``CLIPGUARD_RATE_LIMIT_PER_MINUTE=0``): 64 clients on one key is the load
test, not a tenant. Targets: >= 1,000 polls/s with p99 < 50 ms at 64 clients; upload RSS
growth < 32 MB.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import httpx
import psycopg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from clipguard.app.db import Dataset, Model, make_sessionmaker  # noqa: E402

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise SystemExit(f"timed out waiting for {what}")


@contextmanager
def service(args: argparse.Namespace) -> Iterator[dict]:
    """Redis, a database, a home and uvicorn; yields what the phases need and tears it all down."""
    home = Path(tempfile.mkdtemp(prefix="clipguard-load-"))
    db = f"clipguard_load_{os.getpid()}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{db}"')
    redis_port, api_port = free_port(), free_port()
    procs: list[subprocess.Popen] = []
    try:
        procs.append(
            subprocess.Popen(
                ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                stdout=subprocess.DEVNULL,
            )
        )
        database_url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{db}"
        env = {
            **os.environ,
            "CLIPGUARD_HOME": str(home),
            "CLIPGUARD_DATABASE_URL": database_url,
            "CLIPGUARD_BROKER_URL": f"redis://127.0.0.1:{redis_port}/0",
            "CLIPGUARD_RATE_LIMIT_PER_MINUTE": "0",
            "CLIPGUARD_MAX_UPLOAD_BYTES": str(max(args.upload_mb, 1) * 2**20 + 2**20),
            "CLIPGUARD_DATA_ROOTS": json.dumps([str(home)]),
            "OMP_NUM_THREADS": "1",
            "CLIPGUARD_POLL_READER": args.poll_reader,
        }
        log = (home / "api.log").open("wb")
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "uvicorn",
                    "--factory",
                    "clipguard.app.main:create_app",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(api_port),
                    "--no-access-log",
                    "--log-level",
                    "warning",
                    "--workers",
                    str(args.uvicorn_workers),
                    "--http",
                    args.http,
                    "--loop",
                    args.loop,
                ],
                env=env,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
        url = f"http://127.0.0.1:{api_port}"

        def ready() -> bool:
            try:
                return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, 90, "the API")
        key = subprocess.run(
            [sys.executable, "-m", "clipguard.cli", "keys", "create", "--tenant", "load"],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        # A ready model and a dataset, straight into the store: job creation needs them, not a real checkpoint.
        sessions = make_sessionmaker(database_url, migrate=False)
        with sessions.begin() as s:
            model = Model(tenant="load", arch="small_cnn", num_classes=10, status="ready", canonical_sha256="0" * 64)
            data = Dataset(tenant="load", kind="path", ref=str(home / "train.npz"))
            s.add_all([model, data])
        yield {"url": url, "port": api_port, "key": key, "model": model.id, "data": data.id, "api": procs[-1], "db": db}
    finally:
        for proc in reversed(procs):
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        shutil.rmtree(home, ignore_errors=True)


# ------------------------------------------------------------------------------------------ load generator


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> tuple[int, bytes]:
    writer.write(request)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return status, await reader.readexactly(length)


async def _run_level(
    port: int, clients: int, seconds: float, max_requests: int, make_request: Callable[[], bytes], expect: int
) -> dict:
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds

    async def client() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while time.perf_counter() < deadline and len(latencies) + errors < max_requests:
                t = time.perf_counter()
                status, _ = await _exchange(reader, writer, make_request())
                if status == expect:
                    latencies.append(time.perf_counter() - t)
                else:
                    errors += 1
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    elapsed = time.perf_counter() - started
    latencies.sort()

    def pct(p: float) -> float:
        return 1000 * latencies[min(len(latencies) - 1, int(p * len(latencies)))] if latencies else float("nan")

    return {
        "clients": clients,
        "requests": len(latencies),
        "errors": errors,
        "seconds": round(elapsed, 2),
        "per_s": round(len(latencies) / elapsed, 1),
        "p50_ms": round(pct(0.50), 1),
        "p99_ms": round(pct(0.99), 1),
    }


def _cpu_s(pids: list[int]) -> dict[int, float]:
    """User + system CPU seconds of each process so far (gone processes are left out)."""
    out = {}
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[pid] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime (proc(5) 14, 15)
    return out


def _db_pids(db: str) -> list[int]:
    """The PostgreSQL backends serving the bench's database (their title names it)."""
    out = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            title = cmdline.read_bytes()
            if title.startswith(b"postgres: ") and f" {db} ".encode() in title:
                out.append(int(cmdline.parent.name))
        except OSError:
            continue
    return out


def _used(before: dict[int, float], after: dict[int, float]) -> float:
    return sum(after[p] - before.get(p, 0.0) for p in after)


def _levels(
    svc: dict, levels: list[int], seconds: float, max_requests: int, request: Callable[[], bytes], expect: int
) -> list[dict]:
    """Each level, plus CPU time per request of the API, of its database backends and of the load generator.

    The API's figure is the cost of one request whatever the neighbours do; the sum of the three is
    what one request takes of the machine, so ``1000 / sum`` is the rate one idle core could sustain.
    Backends that connect during the level count from zero; the load generator is this process.
    """
    rows = []
    for n in levels:
        api, db = _cpu_s(_pids(svc["api"].pid)), _cpu_s(_db_pids(svc["db"]))
        client = time.process_time()
        row = asyncio.run(_run_level(svc["port"], n, seconds, max_requests, request, expect))
        per = 1000 / max(row["requests"], 1)
        row["client_cpu_ms_per_req"] = round(per * (time.process_time() - client), 2)
        row["db_cpu_ms_per_req"] = round(per * _used(db, _cpu_s(_db_pids(svc["db"]))), 2)
        row["server_cpu_ms_per_req"] = round(per * _used(api, _cpu_s(_pids(svc["api"].pid))), 2)
        rows.append(row)
    return rows


def polls(svc: dict, levels: list[int], seconds: float, max_requests: int, jobs: list[str]) -> list[dict]:
    auth = f"Authorization: Bearer {svc['key']}\r\n"

    def request() -> bytes:
        return f"GET /v1/jobs/{random.choice(jobs)} HTTP/1.1\r\nHost: bench\r\n{auth}\r\n".encode()

    return _levels(svc, levels, seconds, max_requests, request, 200)


def creations(svc: dict, levels: list[int], seconds: float, max_requests: int) -> list[dict]:
    body = json.dumps({"model_id": svc["model"], "train_data_id": svc["data"], "lam": 3.0}).encode()
    request = (
        f"POST /v1/jobs HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {svc['key']}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    return _levels(svc, levels, seconds, max_requests, lambda: request, 202)


# ------------------------------------------------------------------------------------------ upload memory


def _pids(parent: int) -> list[int]:
    """The API process and its children (uvicorn's worker processes when --workers > 1)."""
    out = [parent]
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == parent:
                out.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    return out


def _kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def upload(svc: dict, megabytes: int) -> dict:
    """Stream ``megabytes`` MiB into PUT /v1/models/{id}/content; the API's RSS is sampled every 20 ms."""
    headers = {"Authorization": f"Bearer {svc['key']}"}
    model = httpx.post(f"{svc['url']}/v1/models", headers=headers, data={"arch": "small_cnn"}).json()
    pids = _pids(svc["api"].pid)
    rss0 = {p: _kib(p, "VmRSS") for p in pids}
    hwm0 = {p: _kib(p, "VmHWM") for p in pids}
    peak = dict(rss0)
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.02):
            for p in pids:
                peak[p] = max(peak[p], _kib(p, "VmRSS"))

    sampler = threading.Thread(target=sample)
    sampler.start()
    chunk = os.urandom(2**20)
    t = time.perf_counter()
    try:
        r = httpx.put(
            f"{svc['url']}/v1/models/{model['id']}/content",
            headers=headers,
            timeout=600,
            content=(chunk for _ in range(megabytes)),
        )
    finally:
        stop.set()
        sampler.join()
    elapsed = time.perf_counter() - t
    if r.status_code != 202:
        raise SystemExit(f"upload answered {r.status_code}: {r.text[:300]}")
    rss_growth = max(peak[p] - rss0[p] for p in pids) / 1024
    hwm_growth = max(_kib(p, "VmHWM") - hwm0[p] for p in pids) / 1024
    return {
        "mib": megabytes,
        "seconds": round(elapsed, 1),
        "mib_per_s": round(megabytes / elapsed, 1),
        "rss_before_mib": round(max(rss0.values()) / 1024, 1),
        "peak_rss_growth_mib": round(rss_growth, 1),
        "vmhwm_growth_mib": round(hwm_growth, 1),
    }


# ------------------------------------------------------------------------------------------ main


def table(title: str, rows: list[dict]) -> str:
    lines = [
        f"{title}",
        "",
        "| clients | requests | req/s | p50 ms | p99 ms | errors | API CPU ms/req "
        "| DB CPU ms/req | client CPU ms/req |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['clients']} | {r['requests']} | {r['per_s']:,.0f} | {r['p50_ms']} | {r['p99_ms']} "
        f"| {r['errors']} | {r['server_cpu_ms_per_req']} | {r['db_cpu_ms_per_req']} "
        f"| {r['client_cpu_ms_per_req']} |"
        for r in rows
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clients", default="1,8,32,64", help="concurrency levels, comma-separated")
    p.add_argument("--seconds", type=float, default=8.0, help="duration of each poll level")
    p.add_argument("--max-requests", type=int, default=50_000, help="cap per poll level")
    p.add_argument("--create-seconds", type=float, default=4.0, help="duration of each job-creation level")
    p.add_argument("--create-max", type=int, default=2_000, help="cap per job-creation level")
    p.add_argument("--jobs", type=int, default=200, help="jobs created before polling (polls pick one at random)")
    p.add_argument("--upload-mb", type=int, default=500, help="size of the streamed upload; 0 skips it")
    p.add_argument("--uvicorn-workers", type=int, default=1)
    p.add_argument("--http", default="auto", help="uvicorn --http: auto (httptools when installed), h11, httptools")
    p.add_argument("--loop", default="auto", help="uvicorn --loop: auto (uvloop when installed), asyncio, uvloop")
    p.add_argument(
        "--poll-reader",
        choices=["async", "thread"],
        default="async",
        help="CLIPGUARD_POLL_READER: the poll on the event loop (psycopg async) or through a thread",
    )
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args()
    levels = [int(n) for n in args.clients.split(",")]

    with service(args) as svc:
        result: dict = {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "python": platform.python_version(),
                "load_avg_at_start": os.getloadavg(),
            },
            "uvicorn_workers": args.uvicorn_workers,
            "http": args.http,
            "loop": args.loop,
            "poll_reader": args.poll_reader,
        }
        if args.upload_mb:  # first, so the poll phases' own peak cannot hide the upload's
            result["upload"] = upload(svc, args.upload_mb)
            print(f"upload {json.dumps(result['upload'])}", flush=True)
        headers = {"Authorization": f"Bearer {svc['key']}"}
        body = {"model_id": svc["model"], "train_data_id": svc["data"], "lam": 3.0}
        jobs = [httpx.post(f"{svc['url']}/v1/jobs", headers=headers, json=body).json()["id"] for _ in range(args.jobs)]
        polls(svc, [1], 1.0, 1000, jobs)  # warm-up: connections, caches, the JIT-free but lazy imports
        result["polls"] = polls(svc, levels, args.seconds, args.max_requests, jobs)
        print(table("GET /v1/jobs/{id}", result["polls"]), flush=True)
        result["create"] = creations(svc, levels, args.create_seconds, args.create_max)
        print(table("POST /v1/jobs", result["create"]), flush=True)
        result["machine"]["load_avg_at_end"] = os.getloadavg()
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
