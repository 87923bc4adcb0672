"""S3 artifact storage against a real S3 HTTP endpoint started here: moto's standalone server.

moto's server is an S3 emulator, not a production object store, but it is a separate process
speaking the S3 REST protocol over HTTP (signed requests, multipart uploads, presigned GETs), so
boto3 and the presigned URLs are exercised as against SeaweedFS or AWS, with one gap: moto does not
verify signatures, so a tampered or expired URL is not refused here. (No real S3 server
installs from the registries the test machines use: Debian has none, PyPI and npm only clients or emulators.)

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
import pytest
import redis
import torch
from clipguard.app.auth import create_key
from clipguard.app.db import make_sessionmaker
from clipguard.app.main import create_app
from clipguard.app.settings import Settings, get_settings
from clipguard.app.storage import (
    LocalStorage,
    S3Storage,
    StorageError,
    StorageUnavailable,
    local_data_ref,
    storage_for,
)
from clipguard.worker.tasks import purify_task
from fastapi.testclient import TestClient

from clipguard.remote import Client

from .conftest import LiveService, free_port, wait_until
from .isolated import isolated_live

pytest.importorskip("moto.server", reason="moto[server] (the S3 endpoint of these tests) is not installed")
pytest.importorskip("boto3", reason="boto3 (the S3 backend) is not installed")

S3_REDIS_DB = 14
CREDENTIALS = {"CLIPGUARD_S3_ACCESS_KEY_ID": "test-key", "CLIPGUARD_S3_SECRET_ACCESS_KEY": "test-secret"}


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory) -> Iterator[str]:
    port = free_port()
    log = (tmp_path_factory.mktemp("moto") / "moto.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT
    )
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
    settings = Settings(
        home=home,
        storage_url=f"s3://{bucket}/clipguard",
        s3_endpoint_url=endpoint,
        s3_access_key_id="test-key",
        s3_secret_access_key="test-secret",
    )
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
    root = tmp_path_factory.mktemp("hosts")
    with isolated_live("s3", S3_REDIS_DB, lambda db, broker: TwoHosts(root, db, broker, s3_endpoint)) as service:
        yield service


def test_a_worker_without_the_apis_folder_purifies_through_s3(two_hosts, model_file, small_npz, tmp_path):
    key = two_hosts.key("acme")
    with Client(two_hosts.url, key) as client:
        model = client.wait_model(client.upload_model(model_file, arch="small_cnn", num_classes=10).id)
        data = client.add_dataset(str(small_npz))
        job = client.wait(client.submit(model.id, data.id, lam=3.0).id, poll_s=0.5, timeout_s=240)
        assert job.state == "succeeded", (job, two_hosts.log("worker")[-3000:])
        paths = client.download(job, tmp_path / "out")  # follows the redirects to the bucket

    # The worker fetched its inputs from the bucket into its own home; the API never saw an artifact file.
    worker_blobs = {p.name for p in (two_hosts.worker_home / "blobs").iterdir()}
    assert f"{data.sha256}.npz" in worker_blobs and any(n.endswith(".safetensors") for n in worker_blobs)
    assert not (two_hosts.logs.parent / "jobs").exists() or not any((two_hosts.logs.parent / "jobs").rglob("*.pt"))
    assert {p.name for p in paths} >= {"purified.pt", "bounds.safetensors", "report.json", "report.html"}
    assert torch.jit.load(str(tmp_path / "out" / "purified.pt")) is not None

    artifact = next(a for a in job.artifacts if a.name == "purified.pt")
    auth = {"Authorization": f"Bearer {key}"}
    r = httpx.get(f"{two_hosts.url}{artifact.url}", headers=auth)
    assert r.status_code == 302 and r.headers["etag"] == f'"{artifact.sha256}"'
    assert r.headers["location"].startswith(f"{two_hosts.env['CLIPGUARD_S3_ENDPOINT_URL']}/live/artifacts/jobs/")
    assert hashlib.sha256(httpx.get(r.headers["location"]).content).hexdigest() == artifact.sha256
    conditional = httpx.get(f"{two_hosts.url}{artifact.url}", headers={**auth, "If-None-Match": r.headers["etag"]})
    assert conditional.status_code == 304


def test_object_storage_faults_are_told_apart(tmp_path, s3_endpoint, monkeypatch):
    """Unreachable is transient (retry later); a missing object is final: the worker treats them differently."""
    dead = s3_settings(tmp_path / "dead", f"http://127.0.0.1:{free_port()}", "unit")
    with pytest.raises(StorageUnavailable, match="fetching blob"):
        storage_for(dead).get_blob(dead.blobs_dir / f"{'cd' * 32}.npz")
    assert list(dead.tmp_dir.iterdir()) == [] and list(dead.blobs_dir.iterdir()) == []
    with pytest.raises(StorageUnavailable, match="while opening bucket unit"):
        storage_for(dead).put_artifact(tmp_path / "dead" / "x", "jobs/j/attempt-1/x")

    live = s3_settings(tmp_path / "live", s3_endpoint, "unit")
    storage_for(live).ensure_bucket()
    with pytest.raises(StorageError, match="refused fetching blob") as missing:
        storage_for(live).get_blob(live.blobs_dir / f"{'ef' * 32}.npz")
    assert not isinstance(missing.value, StorageUnavailable)

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    keyless = Settings(home=tmp_path / "keyless", storage_url="s3://unit/clipguard", s3_endpoint_url=s3_endpoint)
    keyless.ensure_dirs()
    with pytest.raises(StorageError, match="Unable to locate credentials") as unconfigured:
        storage_for(keyless).get_blob(keyless.blobs_dir / f"{'ab' * 32}.npz")
    assert not isinstance(unconfigured.value, StorageUnavailable)  # a configuration error: retrying won't help


def queue_job(client: TestClient, auth: dict, model_file: Path, small_npz: Path) -> dict:
    """Upload a model and a dataset through the bucket and create a job on them."""
    with model_file.open("rb") as f:
        model = client.post(
            "/v1/models", headers=auth, data={"arch": "small_cnn"}, files={"file": (model_file.name, f)}
        ).json()
    wait_until(
        lambda: client.get(f"/v1/models/{model['id']}", headers=auth).json()["status"] == "ready",
        60,
        "the model to pass quarantine",
    )
    data = client.post("/v1/datasets", headers=auth, files={"file": ("d.npz", small_npz.read_bytes())}).json()
    r = client.post("/v1/jobs", headers=auth, json={"model_id": model["id"], "train_data_id": data["id"]})
    assert r.status_code == 202, r.text
    return r.json()


def test_a_job_whose_object_storage_is_down_waits_and_then_fails_with_the_reason(
    tmp_path, s3_endpoint, redis_url, model_file, small_npz, monkeypatch
):
    """The worker cannot fetch the job's blobs: the job goes back to the queue, never stuck "running",
    and once the attempts run out it fails saying the storage was the reason, not a lost worker."""
    api = s3_settings(tmp_path / "api", s3_endpoint, "faults").model_copy(update={"broker_url": redis_url})
    with TestClient(create_app(api)) as client:
        auth = {"Authorization": f"Bearer {create_key(make_sessionmaker(api.database_url), 'acme')}"}
        job = queue_job(client, auth, model_file, small_npz)

        # A worker on another host whose object store is unreachable.
        for name, value in {
            "HOME": str(tmp_path / "worker"),
            "DATABASE_URL": api.database_url,
            "MAX_ATTEMPTS": "2",
            "STORAGE_URL": "s3://faults/clipguard",
            "BROKER_URL": redis_url,
            "S3_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",
        }.items():
            monkeypatch.setenv(f"CLIPGUARD_{name}", value)
        for name, value in CREDENTIALS.items():
            monkeypatch.setenv(name, value)
        get_settings.cache_clear()
        try:
            for attempt in (1, 2):
                with pytest.raises(StorageUnavailable):
                    purify_task(job["id"])  # called directly, Celery's autoretry re-raises instead of requeueing
                polled = client.get(f"/v1/jobs/{job['id']}", headers=auth).json()
                assert polled["state"] == "queued" and polled["attempts"] == attempt, polled
                assert "object storage unavailable while fetching blob" in polled["error"]
            purify_task(job["id"])  # the next delivery finds the attempts spent
        finally:
            get_settings.cache_clear()
        failed = client.get(f"/v1/jobs/{job['id']}", headers=auth).json()
        assert failed["state"] == "failed" and failed["attempts"] == 2
        assert failed["error"].startswith("gave up after 2 attempts; the last one: object storage unavailable")


def test_a_real_worker_retries_a_storage_outage_until_the_job_store_says_stop(
    tmp_path, s3_endpoint, redis_url, model_file, small_npz
):
    """More transient faults than Celery's retry limit used to allow (5): a real worker keeps handing the job
    back until the job store's ``MAX_ATTEMPTS`` (8) is spent, and the job ends failed with the reason instead
    of sitting "queued" with no message left to run it."""
    redis.Redis.from_url(redis_url).flushdb()  # no message from an earlier test for this worker to take
    api = s3_settings(tmp_path / "api", s3_endpoint, "retries").model_copy(update={"broker_url": redis_url})
    with TestClient(create_app(api)) as client:
        auth = {"Authorization": f"Bearer {create_key(make_sessionmaker(api.database_url), 'acme')}"}
        job = queue_job(client, auth, model_file, small_npz)
        env = {
            **os.environ,
            **CREDENTIALS,
            "CLIPGUARD_HOME": str(tmp_path / "worker"),
            "CLIPGUARD_DATABASE_URL": api.database_url,
            "CLIPGUARD_BROKER_URL": redis_url,
            "CLIPGUARD_STORAGE_URL": "s3://retries/clipguard",
            "CLIPGUARD_MAX_ATTEMPTS": "8",
            "CLIPGUARD_S3_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",  # nothing listens there
            "CLIPGUARD_RETRY_BACKOFF_MAX_S": "1",
            "CLIPGUARD_DEVICE": "cpu",
        }
        log = tmp_path / "worker.log"
        worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "clipguard.worker.celery_app:celery_app",
                "worker",
                "-Q",
                "gpu",
                "-c",
                "1",
                "-P",
                "solo",
                "--loglevel",
                "INFO",
                "-n",
                "retries@%h",
            ],
            env=env,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
        )
        try:

            def done() -> bool:
                assert worker.poll() is None, log.read_text(errors="replace")[-3000:]
                return client.get(f"/v1/jobs/{job['id']}", headers=auth).json()["state"] == "failed"

            wait_until(done, 120, "the job to run out of attempts")
        finally:
            worker.terminate()
            worker.wait(timeout=30)
        failed = client.get(f"/v1/jobs/{job['id']}", headers=auth).json()
    assert failed["attempts"] == 8, failed
    assert failed["error"].startswith("gave up after 8 attempts; the last one: object storage unavailable"), failed
    assert log.read_text(errors="replace").count("Retry in") >= 8  # Celery's own retries, past its old limit of 5


def test_uploads_while_object_storage_is_down_are_refused_not_stuck(tmp_path, redis_url, small_npz, model_file):
    dead = s3_settings(tmp_path / "api", f"http://127.0.0.1:{free_port()}", "down").model_copy(
        update={"broker_url": redis_url}
    )
    with TestClient(create_app(dead)) as client:
        auth = {"Authorization": f"Bearer {create_key(make_sessionmaker(dead.database_url), 'acme')}"}
        r = client.post("/v1/datasets", headers=auth, files={"file": ("d.npz", small_npz.read_bytes())})
        with model_file.open("rb") as f:  # a checkpoint is checked first, then shared: it must not stay "validating"
            model = client.post(
                "/v1/models", headers=auth, data={"arch": "small_cnn"}, files={"file": (model_file.name, f)}
            ).json()
        wait_until(
            lambda: client.get(f"/v1/models/{model['id']}", headers=auth).json()["status"] != "validating",
            60,
            "quarantine to decide",
        )
        model = client.get(f"/v1/models/{model['id']}", headers=auth).json()
    assert model["status"] == "rejected" and "could not be shared with the workers" in model["reject_reason"], model
    assert r.status_code == 503 and r.headers["content-type"] == "application/problem+json", r.text
    assert r.headers["retry-after"] and r.json()["type"] == "/problems/storage-unavailable"
    assert "object storage unavailable" in r.json()["detail"]
