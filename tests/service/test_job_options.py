"""Job options reach the engine: what the body asks for is what the report and the job's summary show."""

from __future__ import annotations

import json

from clipguard.app import store
from clipguard.app.db import make_sessionmaker
from clipguard.worker.tasks import run_attempt

from . import test_api
from .test_api import assert_problem, job_body

ready_model, dataset = test_api.ready_model, test_api.dataset


def run(settings, job_id: str) -> None:
    sessions = make_sessionmaker(settings.database_url, migrate=False)
    run_attempt(sessions, settings, store.claim(sessions, job_id, max_attempts=3))


def test_the_reactivation_check_is_a_job_option_and_its_result_is_in_the_summary(
    client, auth, settings, ready_model, dataset
):
    for wrong in ("yes", 1, None):
        body = job_body(ready_model, dataset, reactivation_check=wrong)
        problem = assert_problem(client.post("/v1/jobs", headers=auth, json=body), 422)
        assert any(e["loc"][-1] == "reactivation_check" for e in problem["errors"]), problem
    plain = client.post("/v1/jobs", headers=auth, json=job_body(ready_model, dataset)).json()
    assert "reactivation_check" not in plain["params"]  # the default is left out, as for `resize`

    body = job_body(
        ready_model, dataset, reactivation_check=True, eval={"test_data_id": dataset["id"], "attack": "badnets"}
    )
    job = client.post("/v1/jobs", headers=auth, json=body).json()
    assert job["params"]["reactivation_check"] is True
    run(settings, job["id"])
    done = client.get(f"/v1/jobs/{job['id']}", headers=auth).json()
    assert done["state"] == "succeeded", done["error"]
    again = done["summary"]["reactivation"]
    assert 0.0 <= again["agreement"] <= 1.0 and again["after"]["asr"] is not None, again
    assert done["summary"]["verdict"]["status"] in ("backdoor_found", "no_evidence", "inconclusive")
    report = next(a for a in done["artifacts"] if a["name"] == "report.json")
    body = client.get(report["url"], headers=auth)
    assert json.loads(body.content)["reactivation"]["after"] == again["after"]


def test_a_folder_over_the_resident_cap_is_streamed_by_the_worker(client, auth, settings, ready_model, small_npz):
    """A dataset folder under the data roots that would decode to more than ``MAX_RESIDENT_BYTES`` is read a
    batch at a time: the job succeeds and its report says it streamed (same bounds as in memory:
    tests/test_streaming.py)."""
    import numpy as np
    from PIL import Image

    from clipguard.data import CIFAR10_CLASSES

    folder = settings.data_roots[0] / "folder"
    with np.load(small_npz) as npz:
        for i, (image, label) in enumerate(zip(npz["x"], npz["y"], strict=True)):
            (folder / CIFAR10_CLASSES[label]).mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / CIFAR10_CLASSES[label] / f"{i:04d}.png")
    data = client.post("/v1/datasets", headers=auth, data={"path": str(folder)}).json()
    job = client.post("/v1/jobs", headers=auth, json=job_body(ready_model, data, method="paper")).json()
    run(settings.model_copy(update={"max_resident_bytes": 0}), job["id"])
    done = client.get(f"/v1/jobs/{job['id']}", headers=auth).json()
    assert done["state"] == "succeeded", done["error"]
    url = next(a["url"] for a in done["artifacts"] if a["name"] == "report.json")
    report = json.loads(client.get(url, headers=auth).content)
    assert report["inputs"]["data"]["streamed"] is True and report["inputs"]["data"]["samples"] == 256
