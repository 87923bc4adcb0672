"""The HTTP API in process (real SQLite store, real Redis broker, real quarantine subprocess)."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from clipguard.app import store
from clipguard.app.auth import create_key
from clipguard.app.db import make_sessionmaker
from clipguard.app.main import create_app
from clipguard.app.settings import Settings
from clipguard.worker.tasks import run_attempt
from fastapi.testclient import TestClient
from pydantic import ValidationError

PROBLEM = "application/problem+json"


def assert_problem(response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body = response.json()
    assert body["status"] == status and body["title"] and body["type"]
    assert body["instance"] == response.request.url.path
    return body


def upload(client, auth, path: Path, **fields) -> dict:
    with path.open("rb") as f:
        r = client.post(
            "/v1/models", headers=auth, data={"arch": "small_cnn", **fields}, files={"file": (path.name, f)}
        )
    assert r.status_code == 201, r.text
    assert r.headers["location"] == f"/v1/models/{r.json()['id']}"
    return r.json()


def settled(client, auth, model_id: str) -> dict:
    """The model once quarantine has decided."""
    deadline = time.monotonic() + 60
    while True:
        model = client.get(f"/v1/models/{model_id}", headers=auth).json()
        if model["status"] != "validating" or time.monotonic() > deadline:
            return model
        time.sleep(0.2)


@pytest.fixture
def ready_model(client, auth, model_file) -> dict:
    model = settled(client, auth, upload(client, auth, model_file)["id"])
    assert model["status"] == "ready", model
    return model


@pytest.fixture
def dataset(client, auth, small_npz) -> dict:
    with small_npz.open("rb") as f:
        r = client.post("/v1/datasets", headers=auth, files={"file": ("train.npz", f)})
    assert r.status_code == 201, r.text
    return r.json()


def job_body(model: dict, data: dict, **extra) -> dict:
    return {"model_id": model["id"], "train_data_id": data["id"], "lam": 3.0, **extra}


# ------------------------------------------------------------------ errors and auth


def test_every_error_is_problem_json(client, auth):
    assert_problem(client.get("/no/such/route"), 404)
    assert_problem(client.delete("/healthz"), 405)
    body = assert_problem(client.post("/v1/jobs", headers=auth, json={"lam": "nope"}), 422)
    assert {tuple(e["loc"]) for e in body["errors"]} >= {("body", "model_id"), ("body", "train_data_id")}
    assert_problem(client.get("/v1/jobs?page_token=garbage", headers=auth), 400)


def test_requests_without_a_valid_key_are_refused(client):
    r = client.get("/v1/jobs")
    assert_problem(r, 401)
    assert r.headers["www-authenticate"] == "Bearer"
    assert_problem(client.get("/v1/jobs", headers={"Authorization": "Bearer cg_not-a-key"}), 401)


def test_another_tenants_resources_answer_404(client, key_for, auth, ready_model, dataset):
    job = client.post("/v1/jobs", headers=auth, json=job_body(ready_model, dataset)).json()
    other = key_for("globex")
    assert_problem(client.get(f"/v1/models/{ready_model['id']}", headers=other), 404)
    assert_problem(client.get(f"/v1/datasets/{dataset['id']}", headers=other), 404)
    assert_problem(client.get(f"/v1/jobs/{job['id']}", headers=other), 404)
    assert_problem(client.post(f"/v1/jobs/{job['id']}:cancel", headers=other), 404)
    assert_problem(client.post("/v1/jobs", headers=other, json=job_body(ready_model, dataset)), 404)
    assert client.get("/v1/jobs", headers=other).json()["items"] == []
    assert [j["id"] for j in client.get("/v1/jobs", headers=auth).json()["items"]] == [job["id"]]


def test_ops_endpoints(client, settings, monkeypatch):
    from clipguard.app.presence import beat

    monkeypatch.setattr("clipguard.app.routes.health.WORKERS_CACHE_S", 0.0)  # count workers on every probe
    assert client.get("/healthz").json() == {"status": "ok"}
    # Database and broker answer, but no worker consumes the queue: jobs would sit queued, so not ready.
    assert "no worker" in assert_problem(client.get("/readyz"), 503)["detail"]
    beat(make_sessionmaker(settings.database_url), "w1@test", os.getpid())  # what a worker's heartbeat writes
    assert client.get("/readyz").json() == {"status": "ready"}
    text = client.get("/metrics").text
    assert 'clipguard_jobs{state="queued"}' in text and "clipguard_http_requests_total" in text


# ------------------------------------------------------------------ uploads and quarantine


def test_a_valid_checkpoint_becomes_ready_with_canonical_weights(client, settings, ready_model):
    assert ready_model["sha256"] and ready_model["upload_sha256"]
    assert (settings.blobs_dir / f"{ready_model['sha256']}.safetensors").is_file()


def test_oversized_uploads_get_413_and_leave_nothing_behind(client, settings, auth):
    model = client.post("/v1/models", headers=auth, data={"arch": "small_cnn"}).json()
    url = f"/v1/models/{model['id']}/content"
    too_big = settings.max_upload_bytes + 1
    assert_problem(client.put(url, headers=auth, content=b"\0" * too_big), 413)  # declared length
    chunks = (b"\0" * 65536 for _ in range(too_big // 65536 + 2))  # chunked: counted while streaming
    assert_problem(client.put(url, headers=auth, content=chunks), 413)
    assert list(settings.tmp_dir.iterdir()) == []
    assert list(settings.blobs_dir.iterdir()) == []
    assert client.get(f"/v1/models/{model['id']}", headers=auth).json()["status"] == "awaiting_upload"


def test_streamed_upload_is_hashed_and_quarantined(client, auth, model_file):
    import hashlib

    model = client.post("/v1/models", headers=auth, data={"arch": "small_cnn"}).json()
    assert model["status"] == "awaiting_upload"
    data = model_file.read_bytes()
    r = client.put(
        f"/v1/models/{model['id']}/content",
        headers=auth,
        content=(data[i : i + 50_000] for i in range(0, len(data), 50_000)),
    )
    assert r.status_code == 202 and r.json()["upload_sha256"] == hashlib.sha256(data).hexdigest()
    assert settled(client, auth, model["id"])["status"] == "ready"
    assert_problem(client.put(f"/v1/models/{model['id']}/content", headers=auth, content=data), 409)


class Evil:
    """Unpickling this runs ``touch <marker>``: the quarantine must never unpickle it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_pickle_is_rejected_without_running(client, auth, tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"conv.weight": torch.zeros(1), "payload": Evil(marker)}, path)
    model = settled(client, auth, upload(client, auth, path)["id"])
    assert model["status"] == "rejected" and model["reject_reason"]
    time.sleep(0.5)
    assert not marker.exists()


def test_torchscript_and_mismatched_checkpoints_are_rejected(client, auth, tmp_path, model_file):
    from clipguard.models import resolve_spec

    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(resolve_spec("small_cnn").build()), str(path))
    model = settled(client, auth, upload(client, auth, path)["id"])
    assert model["status"] == "rejected" and "TorchScript" in model["reject_reason"]
    model = settled(client, auth, upload(client, auth, model_file, arch="resnet18")["id"])
    assert model["status"] == "rejected" and "resnet18" in model["reject_reason"]


# ------------------------------------------------------------------ datasets


def test_dataset_paths_outside_the_data_roots_are_refused(client, settings, auth, tmp_path, small_npz):
    root = settings.data_roots[0]
    inside = root / "train.npz"
    inside.write_bytes(small_npz.read_bytes())
    r = client.post("/v1/datasets", headers=auth, data={"path": f"{inside}#train"})
    assert r.status_code == 201 and r.json()["kind"] == "path"
    outside = tmp_path / "secret.npz"
    outside.write_bytes(b"x")
    (root / "link.npz").symlink_to(outside)
    for path in (str(outside), str(root / "link.npz"), f"{root}/../secret.npz", "/etc/passwd", "relative.npz"):
        assert_problem(client.post("/v1/datasets", headers=auth, data={"path": path}), 403)


def test_registered_datasets_and_bad_dataset_requests(client, auth):
    assert client.post("/v1/datasets", headers=auth, data={"registered": "tiny"}).json()["name"] == "tiny"
    assert_problem(client.post("/v1/datasets", headers=auth, data={"registered": "nope"}), 404)
    assert_problem(client.post("/v1/datasets", headers=auth, data={}), 422)
    assert_problem(client.post("/v1/datasets", headers=auth, files={"file": ("x.exe", b"MZ")}), 422)


# ------------------------------------------------------------------ jobs


def test_create_job_returns_202_with_location(client, auth, ready_model, dataset):
    r = client.post("/v1/jobs", headers=auth, json=job_body(ready_model, dataset))
    assert r.status_code == 202
    job = r.json()
    assert r.headers["location"] == f"/v1/jobs/{job['id']}" and r.headers["retry-after"]
    assert job["state"] == "queued" and job["params"]["lam"] == 3.0 and job["artifacts"] == []
    assert client.get(f"/v1/jobs/{job['id']}", headers=auth).json()["id"] == job["id"]


def test_a_paper_job_records_its_method_and_runs_it(client, settings, auth, ready_model, dataset):
    r = client.post("/v1/jobs", headers=auth, json=job_body(ready_model, dataset, method="paper", bounds_samples=100))
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["params"]["method"] == "paper" and job["params"]["bounds_samples"] == 100
    queued = client.get(f"/v1/jobs/{job['id']}", headers=auth)
    assert queued.json()["params"]["method"] == "paper" and queued.headers["retry-after"] == "2"
    assert (
        client.post("/v1/jobs", headers=auth, json=job_body(ready_model, dataset)).json()["params"]["method"] == "guard"
    )
    # The attempt a worker would run, here in process (the message stays in Redis unconsumed).
    sessions = make_sessionmaker(settings.database_url, migrate=False)
    run_attempt(sessions, settings, store.claim(sessions, job["id"], max_attempts=3))
    polled = client.get(f"/v1/jobs/{job['id']}", headers=auth)
    done = polled.json()
    assert done["state"] == "succeeded", done["error"]
    assert "retry-after" not in polled.headers and polled.headers["content-type"] == "application/json"
    assert {a["name"] for a in done["artifacts"]} >= {"purified.pt", "bounds.safetensors", "report.json"}
    listed = {j["id"]: j for j in client.get("/v1/jobs", headers=auth).json()["items"]}
    assert done == listed[job["id"]]  # the poll's one-query answer is the same as every other route's
    report = client.get(f"/v1/jobs/{job['id']}/artifacts/report.json", headers=auth).json()
    assert report["method"] == "paper" and report["lam"] == 3.0
    assert report["statistics"]["samples"] == 100 and report["statistics"]["of"] == 256  # the cap reached the engine
    bad = assert_problem(
        client.post("/v1/jobs", headers=auth, json=job_body(ready_model, dataset, bounds_samples=-1)), 422
    )
    assert bad["errors"][0]["loc"] == ["body", "bounds_samples"]
    bad = assert_problem(
        client.post("/v1/jobs", headers=auth, json=job_body(ready_model, dataset, method="magic")), 422
    )
    assert bad["type"] == "/problems/validation" and bad["errors"][0]["loc"] == ["body", "method"]


def test_status_polls_share_the_configured_thread_hop(settings, model_file, small_npz):
    """POLL_THREADS caps the poll's thread hop; concurrent polls beyond it queue and all get answered."""
    with pytest.raises(ValidationError, match="poll_threads"):
        Settings(poll_threads=0)
    with TestClient(create_app(settings.model_copy(update={"poll_threads": 1}))) as client:
        auth = {"Authorization": f"Bearer {create_key(make_sessionmaker(settings.database_url), 'acme')}"}
        assert client.app.state.poll_limiter.total_tokens == 1
        model = settled(client, auth, upload(client, auth, model_file, arch="small_cnn")["id"])
        data = client.post("/v1/datasets", headers=auth, files={"file": ("d.npz", small_npz.read_bytes())}).json()
        job = client.post("/v1/jobs", headers=auth, json=job_body(model, data)).json()
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: client.get(f"/v1/jobs/{job['id']}", headers=auth), range(32)))
        assert {r.status_code for r in answers} == {200} and {r.json()["id"] for r in answers} == {job["id"]}


def test_idempotency_key_replays_and_refuses_a_different_body(client, auth, ready_model, dataset):
    key = {"Idempotency-Key": "3f1c8a2e-0d7b-4a57-9f43-2d1c5e6b7a80", **auth}
    first = client.post("/v1/jobs", headers=key, json=job_body(ready_model, dataset))
    again = client.post("/v1/jobs", headers=key, json=job_body(ready_model, dataset))
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"]
    assert len(client.get("/v1/jobs", headers=auth).json()["items"]) == 1
    assert_problem(client.post("/v1/jobs", headers=key, json=job_body(ready_model, dataset, lam=5.0)), 422)


def test_jobs_need_a_ready_model_and_a_safe_attack_spec(client, auth, dataset):
    pending = client.post("/v1/models", headers=auth, data={"arch": "small_cnn"}).json()
    assert_problem(client.post("/v1/jobs", headers=auth, json=job_body(pending, dataset)), 409)
    body = job_body(pending, dataset, eval={"test_data_id": dataset["id"], "attack": "/etc/passwd"})
    assert_problem(client.post("/v1/jobs", headers=auth, json=body), 422)


def test_cancel_a_queued_job(client, auth, ready_model, dataset):
    job = client.post("/v1/jobs", headers=auth, json=job_body(ready_model, dataset)).json()
    r = client.post(f"/v1/jobs/{job['id']}:cancel", headers=auth)
    assert r.status_code == 202 and r.json()["state"] == "cancelled" and r.json()["finished_at"]
    assert client.post(f"/v1/jobs/{job['id']}:cancel", headers=auth).status_code == 202  # idempotent


def test_jobs_are_listed_newest_first_in_pages_and_filtered(client, auth, ready_model, dataset):
    ids = [client.post("/v1/jobs", headers=auth, json=job_body(ready_model, dataset)).json()["id"] for _ in range(3)]
    client.post(f"/v1/jobs/{ids[0]}:cancel", headers=auth)
    page = client.get("/v1/jobs?page_size=2", headers=auth).json()
    rest = client.get(f"/v1/jobs?page_size=2&page_token={page['next_page_token']}", headers=auth).json()
    assert [j["id"] for j in page["items"] + rest["items"]] == ids[::-1]
    assert rest["next_page_token"] is None
    assert [j["id"] for j in client.get("/v1/jobs?state=cancelled", headers=auth).json()["items"]] == [ids[0]]
