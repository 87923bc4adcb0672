"""Hostile input through the HTTP API: malformed requests, what the fuzzer found, keys and tenants.

Every refusal must be a 4xx ``application/problem+json`` that says why, must leave nothing
behind, and must tell a caller without a valid key nothing about what exists.
"""

from __future__ import annotations

import base64
import io
import json
import os
import pickle
import socket
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
import redis
import torch
from clipguard.app.auth import revoke_key, revoke_tenant
from clipguard.app.db import make_sessionmaker
from clipguard.app.main import create_app
from fastapi.testclient import TestClient
from PIL import Image

from clipguard.remote import Client

from . import test_api
from .conftest import PG_ADMIN, LiveService, wait_until
from .test_api import assert_problem, job_body

ready_model, dataset = test_api.ready_model, test_api.dataset  # the same fixtures as test_api.py

BOUNDARY = "hostile-boundary"
MULTIPART = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}


def part(name: str, value: bytes, filename: str | None = None) -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    return f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + value + b"\r\n"


END = f"--{BOUNDARY}--\r\n".encode()


# ------------------------------------------------------------------ malformed multipart


def test_malformed_multipart_bodies_are_4xx_problem_json_and_store_nothing(client, settings, auth):
    file_part = part("file", b"\x00" * 5000, "w.safetensors")
    cases = {
        "missing boundary": ({"content-type": "multipart/form-data"}, part("arch", b"small_cnn") + END),
        "truncated in the file": (MULTIPART, part("arch", b"small_cnn") + file_part[:-100]),
        "no closing boundary": (MULTIPART, part("arch", b"small_cnn") + file_part),
        "garbage": (MULTIPART, b"\xff\xfe not multipart at all"),
        "part without a name": (
            MULTIPART,
            b"--" + BOUNDARY.encode() + b"\r\nContent-Disposition: form-data\r\n\r\nx\r\n" + END,
        ),
        "header line without a colon": (MULTIPART, b"--" + BOUNDARY.encode() + b"\r\nnonsense\r\n\r\nx\r\n" + END),
        "wrong content type": ({"content-type": "application/json"}, b'{"arch": "small_cnn"}'),
        "text/plain": ({"content-type": "text/plain"}, b"arch=small_cnn"),
        "required field missing": (MULTIPART, part("num_classes", b"10") + END),
        "file sent as a text field": (MULTIPART, part("arch", b"small_cnn") + part("file", b"not a file") + END),
        "oversized text field": (MULTIPART, part("arch", b"small_cnn") + part("name", b"n" * (2 << 20)) + END),
    }
    for what, (headers, body) in cases.items():
        for url in ("/v1/models", "/v1/datasets"):
            r = client.post(url, headers={**auth, **headers}, content=body)
            assert 400 <= r.status_code < 500, (what, url, r.status_code, r.text)
            assert_problem(r, r.status_code)
    assert client.get("/v1/models", headers=auth).json()["items"] == []
    assert list(settings.tmp_dir.iterdir()) == [] and list(settings.blobs_dir.iterdir()) == []


def test_a_truncated_upload_is_refused_not_registered_without_its_file(client, auth):
    """Regression: python-multipart dropped the cut-off part, so this answered 201 with no file."""
    r = client.post(
        "/v1/models",
        headers={**auth, **MULTIPART},
        content=part("arch", b"small_cnn") + part("file", b"\x01" * 3000, "w.pt")[:-50],
    )
    body = assert_problem(r, 400)
    assert body["type"] == "/problems/malformed-multipart" and "truncated" in body["detail"]
    good = client.post("/v1/models", headers={**auth, **MULTIPART}, content=part("arch", b"small_cnn") + END + b"ep")
    assert good.status_code == 201  # an epilogue after the closing boundary is legal


def test_multipart_uploads_over_the_cap_get_413_and_leave_nothing(client, settings, auth):
    too_big = b"\0" * (settings.max_upload_bytes + 1)
    assert_problem(
        client.post("/v1/models", headers=auth, data={"arch": "small_cnn"}, files={"file": ("w.safetensors", too_big)}),
        413,
    )
    assert_problem(client.post("/v1/datasets", headers=auth, files={"file": ("d.npz", too_big)}), 413)
    assert list(settings.tmp_dir.iterdir()) == [] and list(settings.blobs_dir.iterdir()) == []


def test_bodies_read_into_memory_are_capped_far_below_the_upload_cap(client, auth):
    """Regression: a JSON body could be as large as the 2 GB upload cap, all of it held in memory."""
    big = json.dumps(
        {"model_id": "m", "train_data_id": "d", "eval": {"test_data_id": "t", "attack": {"x": "y" * (2 << 20)}}}
    )
    body = assert_problem(
        client.post("/v1/jobs", headers={**auth, "content-type": "application/json"}, content=big.encode()), 413
    )
    assert "1048576" in body["detail"]
    chunks = (big[i : i + 65536].encode() for i in range(0, len(big), 65536))  # chunked, no Content-Length
    assert_problem(client.post("/v1/jobs", headers={**auth, "content-type": "application/json"}, content=chunks), 413)


# ------------------------------------------------------------------ what the fuzzer found (on PostgreSQL)


@pytest.fixture
def pg_client(settings, pg_url) -> Iterator[tuple[TestClient, dict[str, str]]]:
    from clipguard.app.auth import create_key

    config = settings.model_copy(update={"database_url": pg_url})
    with TestClient(create_app(config)) as client:
        yield client, {"Authorization": f"Bearer {create_key(make_sessionmaker(pg_url), 'fuzzed')}"}


def test_nul_bytes_and_out_of_range_cursors_are_4xx_not_500(pg_client):
    """Each of these answered 500 on PostgreSQL (NUL in text, date overflow in a page token)."""
    client, auth = pg_client

    def token(created: str, row_id: str) -> str:
        return base64.urlsafe_b64encode(json.dumps([created, row_id]).encode()).decode()

    for url in (
        "/v1/datasets/a%00b",
        "/v1/jobs/a%00b",
        "/v1/models/%00",
        "/v1/jobs?model_id=a%00b",
        "/v1/jobs/a/artifacts/x%00",
    ):
        assert assert_problem(client.get(url, headers=auth), 400)["type"] == "/problems/malformed-url"
    for created, row_id in (
        ("2026-01-01T00:00:00+00:00", "a\x00"),
        ("0001-01-01T00:00:00+14:00", "a"),
        ("9999-12-31T23:59:59-14:00", "a"),
    ):
        assert_problem(client.get(f"/v1/jobs?page_token={token(created, row_id)}", headers=auth), 400)
    assert_problem(client.post("/v1/models", headers=auth, data={"arch": "small_cnn", "name": "a\x00b"}), 422)
    assert_problem(client.post("/v1/models", headers=auth, data={"arch": "small\x00cnn"}), 422)
    assert_problem(client.post("/v1/models", headers=auth, data={"arch": "x" * 300}), 422)
    assert_problem(client.post("/v1/datasets", headers=auth, data={"registered": "tiny", "name": "\x00"}), 422)
    assert_problem(client.post("/v1/datasets", headers=auth, data={"path": "/a\x00b"}), 403)
    assert_problem(client.post("/v1/jobs", headers=auth, json={"model_id": "a\x00", "train_data_id": "b"}), 422)
    for mean in ("inf,0,0", "nan,1,1"):
        assert_problem(client.post("/v1/models", headers=auth, data={"arch": "small_cnn", "mean": mean}), 422)
    assert_problem(client.post("/v1/models", headers=auth, data={"arch": "small_cnn", "std": "0.2,0,0.2"}), 422)
    assert client.get("/v1/models", headers=auth).json()["items"] == []


# ------------------------------------------------------------------ keys and tenants


def test_no_wrong_malformed_or_revoked_key_all_get_the_same_401(client, settings, key_for, auth):
    sessions = make_sessionmaker(settings.database_url)
    revoked = key_for("acme")
    assert client.get("/v1/jobs", headers=revoked).status_code == 200
    assert revoke_key(sessions, revoked["Authorization"].removeprefix("Bearer "))
    tenant_key = key_for("initech")
    assert revoke_tenant(sessions, "initech") == 1
    answers = [
        client.get("/v1/jobs", headers=h)
        for h in (
            {},
            {"Authorization": "Bearer cg_wrong"},
            {"Authorization": "Basic YWRtaW46YWRtaW4="},
            {"Authorization": "Bearer "},
            {"Authorization": auth["Authorization"].lower()},
            revoked,
            tenant_key,
        )
    ]
    for r in answers:
        assert_problem(r, 401)
        assert r.headers["www-authenticate"] == "Bearer"
    assert len({r.text for r in answers}) == 1  # nothing tells a revoked key from a made-up one
    # Without a key, even unknown routes and uploads answer 401: no route map, nothing stored.
    assert_problem(client.get("/v1/no-such-thing"), 401)
    assert_problem(client.post("/v1/models", data={"arch": "small_cnn"}, files={"file": ("w.pt", b"x" * 1000)}), 401)
    assert list(settings.blobs_dir.iterdir()) == []
    assert client.get("/v1/jobs", headers=auth).status_code == 200  # other keys keep working
    assert not revoke_key(sessions, "cg_never-issued")


def test_another_tenants_ids_look_exactly_like_ids_that_do_not_exist(
    client, key_for, auth, settings, ready_model, dataset
):
    job = client.post("/v1/jobs", headers=auth, json=job_body(ready_model, dataset)).json()
    other = key_for("globex")
    pairs = {
        f"/v1/models/{ready_model['id']}": "/v1/models/{}",
        f"/v1/datasets/{dataset['id']}": "/v1/datasets/{}",
        f"/v1/jobs/{job['id']}": "/v1/jobs/{}",
        f"/v1/jobs/{job['id']}/artifacts/report.json": "/v1/jobs/{}/artifacts/report.json",
    }
    fake = "0" * 32
    for real, template in pairs.items():
        theirs, missing = client.get(real, headers=other), client.get(template.format(fake), headers=other)
        assert_problem(theirs, 404)
        mine = [ready_model["id"], dataset["id"], job["id"]]
        assert _without_ids(theirs.json(), mine) == _without_ids(missing.json(), [fake])
    before = list(settings.blobs_dir.iterdir())
    assert_problem(client.put(f"/v1/models/{ready_model['id']}/content", headers=other, content=b"x" * 1000), 404)
    assert list(settings.blobs_dir.iterdir()) == before
    assert client.get("/v1/models", headers=other).json()["items"] == []
    assert client.get(f"/v1/jobs?model_id={ready_model['id']}", headers=other).json()["items"] == []
    assert client.get(f"/v1/models/{ready_model['id']}", headers=auth).json()["status"] == "ready"


def _without_ids(body: dict, ids: list[str]) -> dict:
    text = json.dumps(body)
    for i in ids:
        text = text.replace(i, "ID")
    return json.loads(text)


# ------------------------------------------------------------------ through the real service: API, worker, CLI


class SocketPayload:
    """Unpickling this opens a TCP connection to ``port`` and writes ``marker``: code run from a checkpoint."""

    def __init__(self, port: int, marker: Path) -> None:
        self.port, self.marker = port, marker

    def __reduce__(self):
        code = (
            f"import socket; socket.create_connection(('127.0.0.1', {self.port}), 2).close(); "
            f"open({str(self.marker)!r}, 'w').write('pwned')"
        )
        return (exec, (code,))


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A loopback socket a malicious checkpoint would phone home to; ``connected`` tells whether it did."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.setblocking(False)
        yield server


def connected(server: socket.socket) -> bool:
    try:
        server.accept()[0].close()
        return True
    except BlockingIOError:
        return False


def evil_checkpoint(path: Path, port: int, marker: Path) -> Path:
    from clipguard.models import resolve_spec

    torch.save({"state_dict": resolve_spec("small_cnn").build().state_dict(), "x": SocketPayload(port, marker)}, path)
    return path


def test_a_checkpoint_that_would_run_code_is_refused_by_the_cli(tmp_path, small_npz, listener):
    marker = tmp_path / "pwned"
    weights = evil_checkpoint(tmp_path / "evil.pt", listener.getsockname()[1], marker)
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "clipguard.cli",
            "purify",
            "--arch",
            "small_cnn",
            "--weights",
            str(weights),
            "--data",
            str(small_npz),
            "--out",
            str(out),
            "--quiet",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    err = proc.stderr.strip()
    assert proc.returncode == 1 and err.startswith("clipguard: error:") and "\n" not in err, err
    assert "builtins.exec" in err
    assert not marker.exists() and not connected(listener) and not out.exists()
    pickle.loads(pickle.dumps(SocketPayload(listener.getsockname()[1], marker)))  # the payload is live
    assert marker.exists() and connected(listener)


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes]], mode: str = "w") -> Path:
    with tarfile.open(path, mode) as tf:
        for info, data in members:
            info.size = len(data) if info.type == tarfile.REGTYPE else 0
            tf.addfile(info, io.BytesIO(data) if data else None)
    return path


def _png(size: tuple[int, int] = (8, 8), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format="PNG")
    return buf.getvalue()


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


def hostile_archives(root: Path, outside: Path) -> dict[str, tuple[Path, str]]:
    """Each archive holds good images plus one hostile member; value: (archive, words the job error must hold)."""
    good = [(_member(f"{c}/{i}.png"), _png()) for c in ("cat", "dog") for i in range(2)]
    jpeg = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(jpeg, format="JPEG")
    zip_bomb = root / "bomb.zip"
    with zipfile.ZipFile(zip_bomb, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("cat/0.png", _png())
        with zf.open("dog/1.png", "w") as member:  # 300 MiB of zeros in about 300 KiB
            for _ in range(300):
                member.write(bytes(1 << 20))
    return {
        "dot-dot path": (_tar(root / "dotdot.tar", [*good, (_member("../../escape.png"), _png())]), "unsafe path"),
        "absolute path": (_tar(root / "abs.tar", [*good, (_member(f"{outside}/abs.png"), _png())]), "unsafe path"),
        "symlink out": (
            _tar(root / "sym.tar", [*good, (_member("cat/s.png", tarfile.SYMTYPE, "/etc/passwd"), b"")]),
            "link member",
        ),
        "hard link out": (
            _tar(root / "hard.tar", [*good, (_member("cat/h.png", tarfile.LNKTYPE, "../../etc/passwd"), b"")]),
            "link member",
        ),
        "zip bomb": (zip_bomb, "larger than"),
        "decompression bomb": (
            _tar(root / "huge.tar.gz", [*good, (_member("cat/huge.png"), _png((5000, 5000), "L"))], "w:gz"),
            "cap",
        ),
        "truncated JPEG": (
            _tar(root / "trunc.tar.gz", [*good, (_member("dog/broken.jpg"), jpeg.getvalue()[:200])], "w:gz"),
            "broken.jpg",
        ),
    }


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file() or p.is_symlink()}


def outside_job_folders(home: Path, before: set[Path], job_ids: list[str]) -> list[Path]:
    """Files that appeared under ``home`` other than uploads, logs, the decode cache and the jobs' own folders."""
    allowed = [home / "blobs", home / "logs", home / "cache", *(home / "jobs" / j for j in job_ids)]
    return [p for p in files_under(home) - before if not any(p.is_relative_to(a) for a in allowed)]


def test_hostile_archives_fail_their_jobs_with_the_reason(client, settings, auth, ready_model, tmp_path):
    """Upload -> job -> the engine run by the worker's own task body, in process: every kind is refused."""
    from clipguard.app import store
    from clipguard.worker.tasks import run_attempt

    sessions = make_sessionmaker(settings.database_url, migrate=False)
    outside = tmp_path / "outside"
    before, job_ids = files_under(settings.home), []
    for what, (archive, reason) in hostile_archives(tmp_path, outside).items():
        with archive.open("rb") as f:
            data = client.post("/v1/datasets", headers=auth, files={"file": (archive.name, f)}).json()
        job = client.post("/v1/jobs", headers=auth, json=job_body(ready_model, data)).json()
        job_ids.append(job["id"])
        run_attempt(sessions, settings, store.claim(sessions, job["id"], max_attempts=3))
        job = client.get(f"/v1/jobs/{job['id']}", headers=auth).json()
        assert job["state"] == "failed" and reason in job["error"] and "\n" not in job["error"], (what, job)
        assert job["artifacts"] == [], what
    assert outside_job_folders(settings.home, before, job_ids) == []
    assert not outside.exists() and not (settings.home / "escape.png").exists()


@pytest.fixture(scope="module")
def hostile_live(tmp_path_factory, redis_url) -> Iterator[LiveService]:
    """The production topology with a PostgreSQL database of its own: jobs other modules left in the
    shared one would otherwise be swept onto this worker and queue ahead of the ones under test."""
    name = f"clipguard_hostile_{os.getpid()}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    redis.Redis.from_url(redis_url).flushdb()
    service = LiveService(
        tmp_path_factory.mktemp("hostile-home"), f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}", redis_url
    )
    try:
        service.start()
        yield service
    finally:
        service.stop()
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_hostile_uploads_fail_their_jobs_on_the_real_worker_and_it_lives_on(
    hostile_live, model_file, tmp_path, listener
):
    """Through uvicorn, Celery, PostgreSQL and Redis: a checkpoint that would phone home is rejected, two
    hostile archives fail their jobs on the same worker process one after the other, and nothing is
    written outside the job folders."""
    key = hostile_live.key("hostile")
    home = hostile_live.logs.parent
    archives = hostile_archives(tmp_path, tmp_path / "outside")
    with Client(hostile_live.url, key) as client:
        marker = tmp_path / "pwned"
        evil = client.upload_model(
            evil_checkpoint(tmp_path / "evil.pt", listener.getsockname()[1], marker), arch="small_cnn"
        )
        model = client.wait_model(client.upload_model(model_file, arch="small_cnn").id)

        def decided() -> dict:  # the two quarantines run side by side: either may finish first
            return httpx.get(
                f"{hostile_live.url}/v1/models/{evil.id}", headers={"Authorization": f"Bearer {key}"}
            ).json()

        wait_until(lambda: decided()["status"] != "validating", 60, "the hostile checkpoint's verdict")
        evil = decided()
        assert evil["status"] == "rejected" and "builtins.exec" in evil["reject_reason"], evil
        assert not marker.exists() and not connected(listener)

        before, job_ids = files_under(home), []
        for what in ("zip bomb", "symlink out"):
            archive, reason = archives[what]
            data = client.add_dataset(str(archive))
            job = client.submit(model.id, data.id, lam=3.0)
            job_ids.append(job.id)
            job = client.wait(job.id, poll_s=0.5, timeout_s=120)
            assert job.state == "failed" and reason in job.error, (what, job, hostile_live.log("worker")[-2000:])
            assert job.attempts == 1 and job.artifacts == [], (what, job)
    assert hostile_live.procs[1].poll() is None, "the worker died"
    assert httpx.get(f"{hostile_live.url}/readyz").status_code == 200
    assert outside_job_folders(home, before, job_ids) == []
