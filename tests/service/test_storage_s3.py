"""S3 artifact storage against a real S3 HTTP endpoint started here: moto's standalone server.

moto's server is an S3 emulator, not a production object store, but it is a separate process
speaking the S3 REST protocol over HTTP (signed requests, multipart uploads, presigned GETs), so
boto3 and the presigned URLs are exercised as against SeaweedFS or AWS, with one gap: moto does not
verify signatures, so a tampered or expired URL is not refused here. (No real S3 server
installs from this machine's registries: Debian has none, PyPI and npm only clients or emulators.)

The live test is two hosts in miniature: the API and the worker have *different* homes, so the
only way the worker gets the uploaded model and data, and the API gets the artifacts, is the bucket.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
import redis
import torch

from app.client import ClipguardClient
from app.settings import Settings
from app.storage import LocalStorage, S3Storage, local_data_ref, storage_for

from .conftest import PG_ADMIN, LiveService, free_port, wait_until

pytest.importorskip("moto.server", reason="moto[server] (the S3 endpoint of these tests) is not installed")
pytest.importorskip("boto3", reason="boto3 (the S3 backend) is not installed")

REDIS_URL = "redis://127.0.0.1:6379/14"
CREDENTIALS = {"CLIPGUARD_S3_ACCESS_KEY_ID": "test-key", "CLIPGUARD_S3_SECRET_ACCESS_KEY": "test-secret"}


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory) -> Iterator[str]:
    port = free_port()
    log = (tmp_path_factory.mktemp("moto") / "moto.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(url, timeout=1).status_code < 500
        except httpx.HTTPError:
            return False

    try:
        wait_until(up, 30, "the S3 server")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def s3_settings(home: Path, endpoint: str, bucket: str) -> Settings:
    settings = Settings(home=home, storage_url=f"s3://{bucket}/clipguard", s3_endpoint_url=endpoint,
                        s3_access_key_id="test-key", s3_secret_access_key="test-secret")
    settings.ensure_dirs()
    return settings


def test_blobs_and_artifacts_cross_hosts_through_the_bucket(tmp_path, s3_endpoint):
    api = s3_settings(tmp_path / "api", s3_endpoint, "unit")
    worker = s3_settings(tmp_path / "worker", s3_endpoint, "unit")
    assert isinstance(storage_for(api), S3Storage) and storage_for(api) is storage_for(api)
    assert isinstance(storage_for(Settings(home=tmp_path)), LocalStorage)

    blob = api.blobs_dir / f"{'ab' * 32}.npz"
    blob.write_bytes(os.urandom(3 * 1024 * 1024))
    storage_for(api).put_blob(blob)  # creates the bucket on first use
    ref = local_data_ref(storage_for(worker), f"{blob}#train", "upload")
    fetched = worker.blobs_dir / blob.name
    assert ref == f"{fetched}#train" and fetched.read_bytes() == blob.read_bytes()
    assert local_data_ref(storage_for(worker), "/data/cifar#train", "path") == "/data/cifar#train"
    assert list(worker.tmp_dir.iterdir()) == []  # no part file left behind

    out = worker.jobs_dir / "j1" / "attempt-1" / "report.json"
    out.parent.mkdir(parents=True)
    out.write_text('{"ok": true}')
    location = storage_for(worker).put_artifact(out, "jobs/j1/attempt-1/report.json")
    assert location == "s3://unit/clipguard/jobs/j1/attempt-1/report.json"
    url = storage_for(api).download_url(location, "report.json", "application/json")
    assert url and url.startswith(f"{s3_endpoint}/unit/clipguard/jobs/j1/attempt-1/report.json?")
    r = httpx.get(url)
    assert r.status_code == 200 and r.content == b'{"ok": true}'
    assert r.headers["content-disposition"] == 'attachment; filename="report.json"'
    # an artifact written before the switch to S3 is still a local file, served by the API
    assert storage_for(api).download_url(str(out), "report.json", "application/json") is None


class TwoHosts(LiveService):
    """The API and the worker share the database, the broker and the bucket, but no folder."""

    def __init__(self, root: Path, database_url: str, broker_url: str, endpoint: str) -> None:
        super().__init__(root / "api-host", database_url, broker_url)
        self.env.update(CREDENTIALS, CLIPGUARD_STORAGE_URL="s3://live/artifacts", CLIPGUARD_S3_ENDPOINT_URL=endpoint)
        self.worker_home = root / "worker-host"

    def _spawn(self, name: str, argv: list[str]) -> None:
        if name != "worker":
            return super()._spawn(name, argv)
        api_env = self.env
        self.env = {**api_env, "CLIPGUARD_HOME": str(self.worker_home)}
        try:
            super()._spawn(name, argv)
        finally:
            self.env = api_env


@pytest.fixture(scope="module")
def two_hosts(tmp_path_factory, s3_endpoint, redis_url) -> Iterator[TwoHosts]:
    name = f"clipguard_s3_{os.getpid()}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    broker = redis.Redis.from_url(REDIS_URL)
    broker.flushdb()
    service = TwoHosts(tmp_path_factory.mktemp("hosts"), f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}",
                       REDIS_URL, s3_endpoint)
    try:
        service.start()
        yield service
    finally:
        service.stop()
        broker.flushdb()
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_a_worker_without_the_apis_folder_purifies_through_s3(two_hosts, model_file, small_npz, tmp_path):
    key = two_hosts.key("acme")
    with ClipguardClient(two_hosts.url, key) as client:
        model = client.wait_model(client.upload_model(model_file, arch="small_cnn", num_classes=10)["id"])
        data = client.add_dataset(str(small_npz))
        job = client.create_job(model_id=model["id"], train_data_id=data["id"], lam=3.0)
        job = client.wait_job(job["id"], poll_s=0.5, timeout_s=240)
        assert job["state"] == "succeeded", (job, two_hosts.log("worker")[-3000:])
        paths = client.download_artifacts(job, tmp_path / "out")  # follows the redirects to the bucket

    # The worker fetched its inputs from the bucket into its own home; the API never saw an artifact file.
    worker_blobs = {p.name for p in (two_hosts.worker_home / "blobs").iterdir()}
    assert f"{data['sha256']}.npz" in worker_blobs and any(n.endswith(".safetensors") for n in worker_blobs)
    assert not (two_hosts.logs.parent / "jobs").exists() or not any((two_hosts.logs.parent / "jobs").rglob("*.pt"))
    assert {p.name for p in paths} >= {"purified.pt", "bounds.safetensors", "report.json", "report.html"}
    assert torch.jit.load(str(tmp_path / "out" / "purified.pt")) is not None

    artifact = next(a for a in job["artifacts"] if a["name"] == "purified.pt")
    auth = {"Authorization": f"Bearer {key}"}
    r = httpx.get(f"{two_hosts.url}{artifact['url']}", headers=auth)
    assert r.status_code == 302 and r.headers["etag"] == f'"{artifact["sha256"]}"'
    assert r.headers["location"].startswith(f"{two_hosts.env['CLIPGUARD_S3_ENDPOINT_URL']}/live/artifacts/jobs/")
    assert hashlib.sha256(httpx.get(r.headers["location"]).content).hexdigest() == artifact["sha256"]
    conditional = httpx.get(f"{two_hosts.url}{artifact['url']}", headers={**auth, "If-None-Match": r.headers["etag"]})
    assert conditional.status_code == 304
