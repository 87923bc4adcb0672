"""A small synchronous client for the clipguard service (backs ``clipguard remote``)."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx

TERMINAL = ("succeeded", "failed", "cancelled")


class ApiError(Exception):
    """A problem+json answer (or a transport failure) as one line."""


class ClipguardClient:
    def __init__(self, server: str, api_key: str, *, timeout: float = 60.0) -> None:
        self._http = httpx.Client(base_url=server.rstrip("/"), timeout=timeout,
                                  headers={"Authorization": f"Bearer {api_key}"})

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ClipguardClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _call(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, url, **kwargs)
        except httpx.HTTPError as exc:
            raise ApiError(f"{method} {url}: {exc}") from exc
        if response.is_error:
            try:
                problem = response.json()
                message = problem.get("detail") or problem.get("title")
            except ValueError:
                message = response.text[:200]
            raise ApiError(f"{method} {url}: {response.status_code} {message}")
        return response

    # ---------------------------------------------------------------- models

    def upload_model(self, weights: Path, *, arch: str, num_classes: int = 10, mean: Sequence[float] | None = None,
                     std: Sequence[float] | None = None, name: str | None = None) -> dict:
        """Register the model, then stream the file with PUT (no multipart spooling on the server)."""
        fields = {"arch": arch, "num_classes": str(num_classes), "name": name or weights.name}
        if mean:
            fields["mean"] = ",".join(str(v) for v in mean)
        if std:
            fields["std"] = ",".join(str(v) for v in std)
        model = self._call("POST", "/v1/models", data=fields).json()
        with weights.open("rb") as f:
            return self._call("PUT", f"/v1/models/{model['id']}/content", content=f,
                              headers={"Content-Type": "application/octet-stream"}).json()

    def wait_model(self, model_id: str, *, poll_s: float = 0.5, timeout_s: float = 600.0) -> dict:
        """Block until quarantine decides; a rejection raises with its reason."""
        deadline = time.monotonic() + timeout_s
        while True:
            model = self._call("GET", f"/v1/models/{model_id}").json()
            if model["status"] == "ready":
                return model
            if model["status"] == "rejected":
                raise ApiError(f"model rejected: {model['reject_reason']}")
            if time.monotonic() > deadline:
                raise ApiError(f"model {model_id} still {model['status']} after {timeout_s} s")
            time.sleep(poll_s)

    # ---------------------------------------------------------------- datasets

    def add_dataset(self, ref: str) -> dict:
        """``@name`` is a registered dataset, ``server:PATH`` a path under the server's data roots,
        anything else a local archive (``FILE[#split]``) to upload."""
        if ref.startswith("@"):
            return self._call("POST", "/v1/datasets", data={"registered": ref[1:]}).json()
        if ref.startswith("server:"):
            return self._call("POST", "/v1/datasets", data={"path": ref[len("server:"):]}).json()
        path_text, _, split = ref.partition("#")
        path = Path(path_text).expanduser()
        if not path.is_file():
            raise ApiError(f"{path}: not a file; upload a .npz, .tar, .tar.gz or .zip archive "
                           "(or use @name / server:PATH)")
        with path.open("rb") as f:
            return self._call("POST", "/v1/datasets", files={"file": (path.name, f)},
                              data={"split": split} if split else None).json()

    # ---------------------------------------------------------------- jobs

    def create_job(self, *, model_id: str, train_data_id: str, lam: float | str | None = None,
                   granularity: str = "channel", test_data_id: str | None = None,
                   attack: str | dict | None = None, idempotency_key: str | None = None,
                   method: str = "guard") -> dict:
        body: dict[str, Any] = {"model_id": model_id, "train_data_id": train_data_id, "method": method, "lam": lam,
                                "granularity": granularity}
        if test_data_id:
            body["eval"] = {"test_data_id": test_data_id, "attack": attack}
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return self._call("POST", "/v1/jobs", json=body, headers=headers).json()

    def get_job(self, job_id: str) -> dict:
        return self._call("GET", f"/v1/jobs/{job_id}").json()

    def cancel_job(self, job_id: str) -> dict:
        return self._call("POST", f"/v1/jobs/{job_id}:cancel").json()

    def wait_job(self, job_id: str, *, poll_s: float = 1.0, timeout_s: float | None = None,
                 on_update: Callable[[dict], None] | None = None) -> dict:
        """Poll until the job finishes (or ``timeout_s`` passes: ApiError, the job keeps running)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            job = self.get_job(job_id)
            if on_update:
                on_update(job)
            if job["state"] in TERMINAL:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise ApiError(f"job {job_id} still {job['state']} after {timeout_s} s")
            time.sleep(poll_s)

    def download_artifacts(self, job: dict, out: Path) -> list[Path]:
        """Fetch every artifact into ``out``, checking each against its sha256 before it appears."""
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for artifact in job["artifacts"]:
            target = out / artifact["name"]
            part = target.with_name(f".{target.name}.part")
            h = hashlib.sha256()
            try:
                # follow_redirects: S3 storage answers with a presigned URL (httpx drops the API key there)
                with self._http.stream("GET", artifact["url"], follow_redirects=True) as response, \
                        part.open("wb") as f:
                    if response.is_error:
                        raise ApiError(f"GET {artifact['url']}: {response.status_code}")
                    for chunk in response.iter_bytes():
                        h.update(chunk)
                        f.write(chunk)
                if h.hexdigest() != artifact["sha256"]:
                    raise ApiError(f"{artifact['name']}: sha256 mismatch after download")
                os.replace(part, target)
            finally:
                part.unlink(missing_ok=True)
            written.append(target)
        return written
