"""Hostile and careless input through the HTTP API, round two: job parameters validated at the edge, every
resource bounded by what the job needs, and the HTTP details right.

In process (real SQLite store, Redis broker, quarantine subprocess, the worker's task body); the
processes themselves (``clipguard serve``, its worker, header bounds) are in test_supervision.py.
"""

from __future__ import annotations

import io
import os
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from clipguard.app import store
from clipguard.app.auth import create_key
from clipguard.app.cleanup import collect_blobs
from clipguard.app.db import Artifact, Job, make_sessionmaker
from clipguard.app.main import create_app
from clipguard.worker.tasks import run_attempt
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import update

from . import test_api
from .test_api import assert_problem, job_body, settled, upload

ready_model, dataset = test_api.ready_model, test_api.dataset


def run(settings, job_id: str) -> None:
    """The attempt a worker would run, here in process."""
    sessions = make_sessionmaker(settings.database_url, migrate=False)
    run_attempt(sessions, settings, store.claim(sessions, job_id, max_attempts=3))


def image_tar(path: Path, size: tuple[int, int], count: int = 8) -> Path:
    buf = io.BytesIO()
    Image.new("RGB", size).save(buf, format="PNG")
    with tarfile.open(path, "w") as tf:
        for i in range(count):
            info = tarfile.TarInfo(f"{('cat', 'dog')[i % 2]}/{i}.png")
            info.size = len(buf.getvalue())
            tf.addfile(info, io.BytesIO(buf.getvalue()))
    return path


def add_dataset(client, auth, path: Path, **fields) -> dict:
    with path.open("rb") as f:
        r = client.post("/v1/datasets", headers=auth, data=fields, files={"file": (path.name, f)})
    assert r.status_code == 201, r.text
    return r.json()


# ------------------------------------------------------------------ λ


def test_a_lambda_outside_its_range_is_a_422_and_creates_nothing(client, auth, ready_model, dataset):
    """-1 and 0 gave a 'succeeded' model at chance, 1e308 clipped nothing, NaN/Infinity/1e400 were stored."""
    head = {**auth, "content-type": "application/json"}
    for raw in ("-1", "0", "1e308", "NaN", "Infinity", "-Infinity", "1e400", "true", '"3"', "100.01"):
        body = f'{{"model_id": "{ready_model["id"]}", "train_data_id": "{dataset["id"]}", "lam": {raw}}}'
        problem = assert_problem(client.post("/v1/jobs", headers=head, content=body), 422)
        assert problem["errors"][0]["loc"][:2] == ["body", "lam"], (raw, problem)
    assert client.get("/v1/jobs", headers=auth).json()["items"] == []
    for lam in (0.5, 100, "auto"):
        assert client.post("/v1/jobs", headers=auth, json=job_body(ready_model, dataset, lam=lam)).status_code == 202


# ------------------------------------------------------------------ attacks


def test_attacks_in_a_job_body_are_checked_at_the_edge_and_never_name_a_file(client, auth, ready_model, dataset):
    from clipguard.attacks import Blend

    blend = Blend(seed=1).to_dict()
    refused = {
        "an image path in an object": {**blend, "image": "/etc/passwd"},
        "a huge image size": {**blend, "image_size": [100_000, 100_000]},
        "an unknown attack": {"name": "evil"},
        "an incomplete record": {"name": "badnets", "size": 3},
        "a boolean size": {"name": "badnets", "size": True, "pattern": "white", "position": "3,4", "value": 255},
        "an unknown field": {**blend, "command": "rm -rf /"},
        "an image option in a spec": "blend:image=trigger.png",
        "a relative file name": "Makefile",
        "a JSON file name": "blend:victim.json",
        "a bad option value": "badnets:size=0",
        "an unknown option": "wanet:grid=1",
    }
    for what, attack in refused.items():
        body = job_body(ready_model, dataset, eval={"test_data_id": dataset["id"], "attack": attack})
        problem = assert_problem(client.post("/v1/jobs", headers=auth, json=body), 422)
        assert problem["errors"][0]["loc"][:3] == ["body", "eval", "attack"], (what, problem)
    assert client.get("/v1/jobs", headers=auth).json()["items"] == []
    saved = {
        "format": "clipguard-attack",
        "version": 1,
        "attack": blend,
        "tensors": {"file": "../../etc/passwd", "sha256": "0" * 64, "keys": ["pattern"]},
    }
    for attack in (blend, saved, "badnets:size=5,position=3,4", "wanet-all2all:k=8"):
        body = job_body(ready_model, dataset, eval={"test_data_id": dataset["id"], "attack": attack})
        assert client.post("/v1/jobs", headers=auth, json=body).status_code == 202, attack


def test_every_attack_the_engine_knows_is_described_at_the_edge():
    """An attack family added to the engine but not to app/schemas.py would be refused by the API: caught here."""
    from clipguard.app.schemas import SPEC_OPTIONS, JobCreate

    from clipguard.attacks.registry import ATTACKS, build_attack

    assert set(SPEC_OPTIONS) == set(ATTACKS)
    for name, cls in ATTACKS.items():
        assert SPEC_OPTIONS[name] == set(cls.OPTIONS) - {"image"}, name  # every option but a file's name
        record = build_attack(name).to_dict()  # the object `clipguard train` saves, as a job body carries it
        body = JobCreate.model_validate(
            {"model_id": "m", "train_data_id": "d", "eval": {"test_data_id": "t", "attack": record}}
        )
        assert body.eval.attack.model_dump(mode="json", exclude_none=True).items() <= record.items(), name


def test_a_saved_blend_record_is_rebuilt_from_its_seed_and_measures_asr(client, settings, auth, ready_model, dataset):
    from clipguard.attacks import Blend

    record = Blend(seed=1).to_dict()
    body = job_body(ready_model, dataset, method="paper", eval={"test_data_id": dataset["id"], "attack": record})
    job = client.post("/v1/jobs", headers=auth, json=body).json()
    assert job["params"]["attack"]["pattern_sha256"] == record["pattern_sha256"]
    run(settings, job["id"])
    job = client.get(f"/v1/jobs/{job['id']}", headers=auth).json()
    assert job["state"] == "succeeded", job["error"]
    report = client.get(f"/v1/jobs/{job['id']}/artifacts/report.json", headers=auth).json()
    assert report["evaluation"]["attack"]["pattern_sha256"] == record["pattern_sha256"]
    assert "asr" in report["evaluation"]["before"]


def test_an_attack_record_stored_before_validation_opens_no_file(
    client, settings, auth, ready_model, dataset, tmp_path
):
    """A job stored by an older API with a free-form attack object: the worker refuses the file the same way
    whether it exists or not (the old answers told existing from missing files)."""
    from clipguard.attacks import Blend

    errors = []
    for image in ("/etc/passwd", str(tmp_path / "missing.png")):
        job = client.post(
            "/v1/jobs",
            headers=auth,
            json=job_body(ready_model, dataset, eval={"test_data_id": dataset["id"], "attack": "badnets"}),
        ).json()
        with make_sessionmaker(settings.database_url).begin() as s:
            s.execute(
                update(Job)
                .where(Job.id == job["id"])
                .values(params={"lam": 3.0, "attack": {**Blend(seed=1).to_dict(), "image": image}})
            )
        run(settings, job["id"])
        job = client.get(f"/v1/jobs/{job['id']}", headers=auth).json()
        assert job["state"] == "failed" and "trigger image file is not read" in job["error"], job
        errors.append(job["error"])
    assert errors[0] == errors[1]


# ------------------------------------------------------------------ data: sizes, names, paths


def test_data_errors_name_the_dataset_and_never_a_server_path(client, settings, auth, ready_model, tmp_path):
    big = add_dataset(client, auth, image_tar(tmp_path / "big.tar", (64, 64)))
    liar = tmp_path / "liar.npz"
    np.savez_compressed(liar, x=np.zeros((3000, 32, 32, 3), dtype=np.uint8), y=np.zeros(3000, dtype=np.int64))
    liar = add_dataset(client, auth, liar, name="my blank images")
    cases = (
        (big, "dataset 'big.tar'", "larger than the model's 32x32 input"),
        (liar, "dataset 'my blank images'", "over the cap of 1000000 bytes"),
    )
    small_cap = settings.model_copy(update={"max_decoded_bytes": 1_000_000})
    for data, name, reason in cases:
        job = client.post("/v1/jobs", headers=auth, json=job_body(ready_model, data)).json()
        run(small_cap, job["id"])
        job = client.get(f"/v1/jobs/{job['id']}", headers=auth).json()
        assert job["state"] == "failed" and name in job["error"] and reason in job["error"], job["error"]
        assert str(settings.home) not in job["error"] and data["sha256"] not in job["error"], job["error"]
    folder = settings.data_roots[0] / "train"  # a path dataset: its own file names are the client's words
    with tarfile.open(image_tar(tmp_path / "small.tar", (16, 16))) as tf:
        tf.extractall(folder, filter="data")
    small = client.post("/v1/datasets", headers=auth, data={"path": str(folder)}).json()
    job = client.post("/v1/jobs", headers=auth, json=job_body(ready_model, small)).json()
    run(settings, job["id"])
    error = client.get(f"/v1/jobs/{job['id']}", headers=auth).json()["error"]
    assert (
        error == f"training data dataset '{folder}' has 16x16 images but small_cnn takes 32x32; resize the "
        'data first, or ask for resizing (the job field "resize": true)'
    ), error
    resized = client.post("/v1/jobs", headers=auth, json=job_body(ready_model, big, method="paper", resize=True)).json()
    assert resized["params"]["resize"] is True
    run(settings, resized["id"])
    assert client.get(f"/v1/jobs/{resized['id']}", headers=auth).json()["state"] == "succeeded"


def test_dataset_names_from_file_names_and_paths_are_checked(client, settings, auth, small_npz):
    blob = small_npz.read_bytes()
    for filename in ("a\x1b[2Jb.npz", "x" * 300 + ".npz"):
        r = client.post("/v1/datasets", headers=auth, files={"file": (filename, blob)})
        assert assert_problem(r, 422)["detail"].startswith("the file name or path cannot be the dataset's name")
    assert client.get("/v1/jobs", headers=auth).status_code == 200 and list(settings.blobs_dir.iterdir()) == []
    named = client.post("/v1/datasets", headers=auth, data={"name": "fine"}, files={"file": ("a\x1bb.npz", blob)})
    assert named.status_code == 201 and named.json()["name"] == "fine"
    odd = settings.data_roots[0] / "tab\there.npz"
    odd.write_bytes(blob)
    assert_problem(client.post("/v1/datasets", headers=auth, data={"path": str(odd)}), 422)
    assert client.post("/v1/datasets", headers=auth, data={"path": str(odd), "name": "ok"}).status_code == 201


def test_only_regular_files_and_folders_under_a_data_root_are_datasets(client, settings, auth):
    """A FIFO was accepted; the job on it hung in `load`, ignoring cancel, for the 4-hour limit."""
    root = settings.data_roots[0]
    os.mkfifo(root / "pipe.npz")
    assert (
        "regular file"
        in assert_problem(client.post("/v1/datasets", headers=auth, data={"path": str(root / "pipe.npz")}), 422)[
            "detail"
        ]
    )
    (root / "folder").mkdir()
    assert client.post("/v1/datasets", headers=auth, data={"path": str(root / "folder")}).status_code == 201


# ------------------------------------------------------------------ hung jobs


@pytest.fixture
def blocked_load(monkeypatch) -> Iterator[None]:
    """The engine's data loading blocked in a read that never returns (a pipe nobody writes to)."""
    r, w = os.pipe()

    def load_data(*_args, **_kwargs):
        os.read(r, 1)
        raise AssertionError("the blocked read returned")

    monkeypatch.setattr("clipguard.purify.load_data", load_data)
    yield
    os.close(w)
    os.close(r)


def wait_for(check, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_job_blocked_in_a_read_is_cancelled(client, settings, auth, ready_model, dataset, blocked_load):
    job = client.post("/v1/jobs", headers=auth, json=job_body(ready_model, dataset)).json()
    quick = settings.model_copy(update={"heartbeat_s": 0.2, "cancel_grace_s": 0.5})

    def cancel_once_loading() -> None:
        wait_for(lambda: client.get(f"/v1/jobs/{job['id']}", headers=auth).json()["stage"] == "load")
        assert client.post(f"/v1/jobs/{job['id']}:cancel", headers=auth).status_code == 202

    canceller = threading.Thread(target=cancel_once_loading)
    canceller.start()
    run(quick, job["id"])  # in the main thread, where the watchdog's signal lands
    canceller.join()
    assert client.get(f"/v1/jobs/{job['id']}", headers=auth).json()["state"] == "cancelled"


def test_a_job_that_makes_no_progress_is_stopped_and_failed(client, settings, auth, ready_model, dataset, blocked_load):
    job = client.post("/v1/jobs", headers=auth, json=job_body(ready_model, dataset)).json()
    run(settings.model_copy(update={"heartbeat_s": 0.2, "stall_timeout_s": 1.0}), job["id"])
    job = client.get(f"/v1/jobs/{job['id']}", headers=auth).json()
    assert job["state"] == "failed" and job["error"].startswith("no progress for") and "stage load" in job["error"]


# ------------------------------------------------------------------ artifacts over HTTP


@pytest.fixture
def finished_job(client, settings, auth, ready_model, dataset) -> tuple[dict, Path]:
    """A succeeded job with one 1000-byte artifact (rows written as the worker writes them)."""
    job = client.post("/v1/jobs", headers=auth, json=job_body(ready_model, dataset)).json()
    path = settings.jobs_dir / job["id"] / "attempt-1" / "report.json"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"x" * 1000)
    with make_sessionmaker(settings.database_url).begin() as s:
        s.execute(update(Job).where(Job.id == job["id"]).values(state="succeeded"))
        s.add(
            Artifact(
                job_id=job["id"],
                name="report.json",
                path=str(path),
                sha256="ab" * 32,
                size=1000,
                media_type="application/json",
            )
        )
    return job, path


def test_ranges_and_conditional_downloads_follow_rfc_9110(client, auth, finished_job):
    job, _ = finished_job
    url = f"/v1/jobs/{job['id']}/artifacts/report.json"
    for ignored in ("items=0-10", "bytes=abc", "bytes=5-3", "bytes"):  # a unit or range we cannot use: whole file
        r = client.get(url, headers={**auth, "Range": ignored})
        assert r.status_code == 200 and len(r.content) == 1000, ignored
    r = client.get(url, headers={**auth, "Range": "bytes=0-9"})
    assert r.status_code == 206 and r.content == b"x" * 10 and r.headers["content-range"] == "bytes 0-9/1000"
    r = client.get(url, headers={**auth, "Range": "bytes=5000-"})
    assert assert_problem(r, 416)["type"] == "/problems/range-not-satisfiable"
    assert r.headers["content-range"] == "bytes */1000"
    etag = client.get(url, headers=auth).headers["etag"]
    for tag in ("*", etag, f"W/{etag}", f'"other", {etag}'):
        assert client.get(url, headers={**auth, "If-None-Match": tag}).status_code == 304, tag
    assert client.get(url, headers={**auth, "If-None-Match": '"other"'}).status_code == 200


# ------------------------------------------------------------------ deleting, quota, collection


def test_models_datasets_and_jobs_can_be_deleted_with_their_files(
    client, settings, auth, ready_model, dataset, finished_job
):
    job, path = finished_job
    queued = client.post("/v1/jobs", headers=auth, json=job_body(ready_model, dataset)).json()
    assert (
        assert_problem(client.delete(f"/v1/jobs/{queued['id']}", headers=auth), 409)["type"] == "/problems/job-active"
    )
    assert_problem(client.delete(f"/v1/models/{ready_model['id']}", headers=auth), 409)
    assert_problem(client.delete(f"/v1/datasets/{dataset['id']}", headers=auth), 409)
    client.post(f"/v1/jobs/{queued['id']}:cancel", headers=auth)
    for j in (queued, job):
        assert client.delete(f"/v1/jobs/{j['id']}", headers=auth).status_code == 204
        assert_problem(client.get(f"/v1/jobs/{j['id']}", headers=auth), 404)
    assert not path.exists() and not (settings.jobs_dir / job["id"]).exists()
    assert client.delete(f"/v1/models/{ready_model['id']}", headers=auth).status_code == 204
    assert client.delete(f"/v1/datasets/{dataset['id']}", headers=auth).status_code == 204
    assert_problem(client.get(f"/v1/models/{ready_model['id']}", headers=auth), 404)
    assert_problem(client.delete(f"/v1/datasets/{dataset['id']}", headers=auth), 404)


def test_unused_blobs_and_decided_uploads_are_collected(client, settings, auth, ready_model, dataset, small_npz):
    sessions = make_sessionmaker(settings.database_url)
    kept = add_dataset(client, auth, small_npz, name="same bytes, another row")  # shares the blob of `dataset`
    assert collect_blobs(sessions, settings) == []  # everything is young or in use
    later = time.time() + settings.upload_retention_s + 1
    upload_blob = f"{ready_model['upload_sha256']}.upload"
    assert collect_blobs(sessions, settings, now=later) == [upload_blob]  # decided: past its retention
    client.delete(f"/v1/models/{ready_model['id']}", headers=auth)
    client.delete(f"/v1/datasets/{dataset['id']}", headers=auth)
    assert collect_blobs(sessions, settings, now=later) == [f"{ready_model['sha256']}.safetensors"]
    client.delete(f"/v1/datasets/{kept['id']}", headers=auth)
    assert collect_blobs(sessions, settings, now=later) == [f"{kept['sha256']}.npz"]
    assert list(settings.blobs_dir.iterdir()) == []


def test_a_tenant_over_its_storage_quota_gets_403_until_it_deletes(settings, model_file, small_npz):
    model_size = model_file.stat().st_size
    config = settings.model_copy(update={"tenant_quota_bytes": model_size})
    with TestClient(create_app(config)) as client:
        auth = {"Authorization": f"Bearer {create_key(make_sessionmaker(settings.database_url), 'acme')}"}
        other = {"Authorization": f"Bearer {create_key(make_sessionmaker(settings.database_url), 'globex')}"}
        model = settled(client, auth, upload(client, auth, model_file)["id"])  # exactly the quota
        r = client.post("/v1/datasets", headers=auth, files={"file": ("d.npz", small_npz.read_bytes())})
        assert assert_problem(r, 403)["type"] == "/problems/quota-exceeded"
        pending = client.post("/v1/models", headers=auth, data={"arch": "small_cnn"}).json()
        assert_problem(client.put(f"/v1/models/{pending['id']}/content", headers=auth, content=b"x" * 100), 403)
        data = client.post("/v1/datasets", headers=auth, data={"registered": "tiny"}).json()  # the operator's
        assert_problem(client.post("/v1/jobs", headers=auth, json=job_body(model, data)), 403)
        assert (
            client.post("/v1/datasets", headers=other, files={"file": ("d.npz", small_npz.read_bytes())}).status_code
            == 201
        )  # another tenant's quota is its own
        assert client.delete(f"/v1/models/{model['id']}", headers=auth).status_code == 204
        assert (
            client.post("/v1/datasets", headers=auth, files={"file": ("d.npz", small_npz.read_bytes())}).status_code
            == 201
        )


# ------------------------------------------------------------------ quarantine queue


def test_quarantine_runs_one_check_at_a_time_and_bounds_each_tenants_queue(settings, model_file):
    """Six concurrent uploads ran six quarantine subprocesses (8 GiB each) on the API's shared thread pool."""
    config = settings.model_copy(update={"quarantine_concurrency": 1, "quarantine_queue_per_tenant": 2})
    with TestClient(create_app(config)) as client:
        sessions = make_sessionmaker(settings.database_url)
        a = {"Authorization": f"Bearer {create_key(sessions, 'acme')}"}
        b = {"Authorization": f"Bearer {create_key(sessions, 'globex')}"}
        first, second = upload(client, a, model_file), upload(client, a, model_file)
        with model_file.open("rb") as f:
            r = client.post("/v1/models", headers=a, data={"arch": "small_cnn"}, files={"file": ("w.st", f)})
        busy = assert_problem(r, 429)
        assert busy["type"] == "/problems/quarantine-busy" and r.headers["retry-after"]
        theirs = upload(client, b, model_file)  # another tenant is not held back by acme's places
        for headers, model in ((a, first), (a, second), (b, theirs)):
            assert settled(client, headers, model["id"])["status"] == "ready"
        assert client.app.state.quarantine.peak == 1
        assert client.get("/v1/models", headers=a).json()["items"].__len__() == 2  # the refused upload left no row
