"""End to end over real HTTP: uvicorn + a Celery worker process + Redis + PostgreSQL.

The user's flow through ``clipguard.remote.Client`` (what ``clipguard remote purify`` runs): upload
a model and a CIFAR-10 cut, start a job, poll it to success, download the artifacts and load
the purified TorchScript model.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import httpx
import pytest
import torch

from clipguard.data import load_data
from clipguard.remote import Client
from clipguard.stages import Stage
from clipguard.train import train_victim


def test_purify_over_http_with_a_real_worker(live, model_file, small_npz, tmp_path):
    key = live.key("acme")
    seen: list[tuple[str, str | None]] = []
    with Client(live.url, key) as client:
        model = client.wait_model(client.upload_model(model_file, arch="small_cnn", num_classes=10).id)
        data = client.add_dataset(str(small_npz))
        job = client.submit(model.id, data.id, lam=3.0, test_data_id=data.id, attack="badnets", idempotency_key="e2e-1")
        job = client.wait(job.id, poll_s=0.5, timeout_s=240, on_update=lambda j: seen.append((j.state, j.stage)))
        assert job.state == "succeeded", (job, live.log("worker")[-3000:])
        assert job.attempts == 1 and job.percent == 100.0 and job.finished_at
        assert {a.name for a in job.artifacts} >= {"purified.pt", "bounds.safetensors", "report.json", "report.html"}
        assert job.summary["lam"] == 3.0 and job.summary["before"] and job.summary["after"]
        paths = client.download(job, tmp_path / "out")
    assert ("succeeded", "done") in seen

    purified = torch.jit.load(str(tmp_path / "out" / "purified.pt"))
    images = load_data(small_npz).images[:8].float() / 255
    assert purified(images).shape == (8, 10)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["lam"] == 3.0 and {p.name for p in paths} == set(report["artifacts"])

    # Artifact downloads: sha256 ETag, conditional GET, byte ranges; other tenants see nothing.
    artifact = next(a for a in job.artifacts if a.name == "purified.pt")
    url = f"{live.url}{artifact.url}"
    auth = {"Authorization": f"Bearer {key}"}
    full = httpx.get(url, headers=auth)
    assert full.headers["etag"] == f'"{artifact.sha256}"'
    assert hashlib.sha256(full.content).hexdigest() == artifact.sha256
    assert httpx.get(url, headers={**auth, "If-None-Match": full.headers["etag"]}).status_code == 304
    part = httpx.get(url, headers={**auth, "Range": "bytes=10-19"})
    assert part.status_code == 206 and part.content == full.content[10:20]
    stranger = {"Authorization": f"Bearer {live.key('globex')}"}
    assert httpx.get(url, headers=stranger).status_code == 404

    # The job store, not Celery, answers: the job row is in PostgreSQL and /metrics counts it.
    assert 'clipguard_jobs{state="succeeded"} 1.0' in httpx.get(f"{live.url}/metrics").text


def test_a_guard_jobs_percent_only_rises_to_100_over_http(live, model_file, small_npz):
    """The default method, as a client polls it: stages in pipeline order, the percent never going back."""
    with Client(live.url, live.key("acme")) as client:
        model = client.wait_model(client.upload_model(model_file, arch="small_cnn", num_classes=10).id)
        data = client.add_dataset(str(small_npz))
        job = client.submit(model.id, data.id, test_data_id=data.id, attack="badnets")  # method: guard, the default
        seen: list[tuple[str | None, float | None]] = []
        job = client.wait(job.id, poll_s=0.1, timeout_s=300, on_update=lambda j: seen.append((j.stage, j.percent)))
        assert job.state == "succeeded", (job, live.log("worker")[-3000:])
    running = [(stage, pct) for stage, pct in seen if stage not in (None, "starting")]
    percents = [pct or 0.0 for _, pct in seen]
    assert percents == sorted(percents) and percents[-1] == 100.0, seen
    order = list(Stage)
    assert [order.index(Stage(stage)) for stage, _ in running] == sorted(order.index(Stage(s)) for s, _ in running)
    assert {"detect_poison", "confirm"} <= set(job.summary["timings"]), job.summary  # guard's stages ran


@pytest.fixture(scope="module")
def victim(tmp_path_factory, cifar10, data_cache) -> Path:
    """A small CNN with a real BadNets backdoor: 2,000 CIFAR-10 training images, 10% poisoned."""
    root = tmp_path_factory.mktemp("victim")
    train_victim(
        arch="small_cnn",
        data=f"{cifar10}#train",
        out=root / "victim.safetensors",
        limit=2000,
        epochs=5,
        augment=False,
        lr=0.05,
        batch_size=128,
        attack="badnets:pattern=checkerboard",
        poison_rate=0.1,
        device="cpu",
        cache_dir=data_cache,
        save_data=root / "poisoned.npz",
    )
    return root


@pytest.mark.slow
def test_the_backdoor_is_removed_over_http(live, victim, small_npz, tmp_path):
    attack = json.loads((victim / "victim.safetensors.attack.json").read_text())
    with Client(live.url, live.key("acme")) as client:
        model = client.wait_model(client.upload_model(victim / "victim.safetensors", arch="small_cnn").id)
        train = client.add_dataset(str(victim / "poisoned.npz"))
        test = client.add_dataset(str(small_npz))
        job = client.submit(model.id, train.id, lam=3.0, test_data_id=test.id, attack=attack)
        job = client.wait(job.id, poll_s=0.5, timeout_s=240)
        assert job.state == "succeeded", (job, live.log("worker")[-3000:])
    before, after = job.summary["before"], job.summary["after"]
    assert before["asr"] > 0.8, before  # the victim really is backdoored
    assert after["asr"] < before["asr"] - 0.5, (before, after)
    assert after["acc"] > before["acc"] - 0.15, (before, after)


def test_oversized_streamed_upload_gets_413_with_flat_memory(live):
    auth = {"Authorization": f"Bearer {live.key('acme')}"}
    model = httpx.post(f"{live.url}/v1/models", headers=auth, data={"arch": "small_cnn"}).json()
    chunk = b"\0" * (1024 * 1024)
    before = live.peak_rss_kib()
    r = httpx.put(
        f"{live.url}/v1/models/{model['id']}/content",
        headers=auth,  # chunked: no Content-Length
        content=(chunk for _ in range(2 * live.MAX_UPLOAD // len(chunk))),
        timeout=60,
    )
    assert r.status_code == 413 and r.headers["content-type"] == "application/problem+json"
    r = httpx.put(
        f"{live.url}/v1/models/{model['id']}/content",
        headers=auth,  # just under the cap: stored
        content=(chunk for _ in range(live.MAX_UPLOAD // len(chunk) - 1)),
        timeout=60,
    )
    assert r.status_code == 202 and r.json()["size"] == live.MAX_UPLOAD - len(chunk)
    grown_mib = (live.peak_rss_kib() - before) / 1024
    assert grown_mib < 16, f"API resident memory grew by {grown_mib:.0f} MiB for a 64 MiB upload"
