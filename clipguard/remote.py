"""A typed client for the clipguard service; ``clipguard remote`` is built on it.

    from clipguard.remote import Client

    with Client("http://127.0.0.1:8000", api_key, progress=True) as c:
        model = c.upload_model("victim.safetensors", arch="small_cnn")
        train = c.add_dataset("poisoned/")            # a folder is streamed as a tar
        c.wait_model(model.id)
        job = c.wait(c.submit(model.id, train.id, lam="auto").id)
        c.download(job, "out/")

It needs httpx, pydantic and tqdm only (never the web stack or torch), so it runs on a laptop
that only talks to a server. Every error is a :class:`RemoteError` with a one-line message; an
error answer of the API is an :class:`ApiError` carrying the problem+json fields.
"""

from __future__ import annotations

import hashlib
import os
import queue
import sys
import tarfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, TypeVar

import httpx
from pydantic import BaseModel, ConfigDict, Field

from clipguard.errors import ClipguardError
from clipguard.files import atomic_path
from clipguard.methods import DEFAULTS, Granularity, Method

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
ModelStatus = Literal["awaiting_upload", "validating", "ready", "rejected"]
TERMINAL: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
ARCHIVE_SUFFIXES = (".npz", ".tar", ".tar.gz", ".tgz", ".zip")
"""What the server accepts as a dataset upload; a local folder is sent as a ``.tar`` instead."""
READ_ATTEMPTS = 3
"""Tries of a read (``GET``) on a dropped connection: a server restarting under a long wait is not an error."""
OUTAGE_S = 120.0
"""How long :meth:`Client.wait` keeps polling through refused connections, 429 and 503 answers (an API restart,
a database failover) before it gives up."""
UPLOAD_ATTEMPTS = 3
"""Tries of a checkpoint's ``PUT`` on a dropped connection: the model waits for its content until one lands."""
CHUNK = 1024 * 1024


class RemoteError(ClipguardError):
    """Anything the client could not do, as one line for the person at the keyboard."""


class ApiError(RemoteError):
    """The server answered with an error (``application/problem+json``)."""

    def __init__(
        self, method: str, url: str, status: int, problem: dict[str, Any], retry_after: float | None = None
    ) -> None:
        self.method, self.url, self.status, self.retry_after = method, url, status, retry_after
        self.type: str = problem.get("type", "about:blank")
        self.title: str | None = problem.get("title")
        self.detail: str | None = problem.get("detail")
        self.errors: list[dict[str, Any]] = problem.get("errors") or []
        super().__init__(f"{method} {url}: {status} {self.detail or self.title or 'error'}")


class _Resource(BaseModel):
    # Fields the server adds later are ignored, so an older client keeps working.
    model_config = ConfigDict(extra="ignore", frozen=True)


class Model(_Resource):
    id: str
    name: str | None = None
    arch: str
    num_classes: int
    mean: list[float] | None = None
    std: list[float] | None = None
    status: ModelStatus
    reject_reason: str | None = None
    sha256: str | None = None
    upload_sha256: str | None = None
    size: int | None = None
    created_at: datetime


class Dataset(_Resource):
    id: str
    kind: Literal["upload", "path", "registered"]
    name: str | None = None
    sha256: str | None = None
    size: int | None = None
    created_at: datetime


class Artifact(_Resource):
    name: str
    url: str
    sha256: str
    size: int
    media_type: str


class Job(_Resource):
    id: str
    state: JobState
    stage: str | None = None
    percent: float | None = None
    error: str | None = None
    attempts: int = 0
    cancel_requested: bool = False
    model_id: str
    train_data_id: str
    test_data_id: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    artifacts: list[Artifact] = Field(default_factory=list)
    summary: dict[str, Any] | None = None

    @property
    def done(self) -> bool:
        return self.state in TERMINAL


R = TypeVar("R", bound=_Resource)


def parse_reference(ref: str | os.PathLike) -> tuple[Path, str | None]:
    """``"data.tar.gz#train"`` -> (path, ``"train"``), as ``clipguard purify --data`` reads it."""
    text = os.fspath(ref)
    if "#" in text:
        path, split = text.rsplit("#", 1)
        return Path(path).expanduser(), (split.strip("/") or None)
    return Path(text).expanduser(), None


class _Bar:
    """A tqdm bar on stderr when the client shows progress, else nothing."""

    def __init__(self, show: bool, total: float | None, desc: str, unit: str = "B") -> None:
        self._bar = None
        if show:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total,
                desc=desc,
                unit=unit,
                unit_scale=unit == "B",
                unit_divisor=1024,
                file=sys.stderr,
                leave=False,
            )

    def add(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def show(self, desc: str, n: float) -> None:
        if self._bar is not None:
            self._bar.set_description(desc, refresh=False)
            self._bar.update(n - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class _CountedFile:
    """A file whose reads advance a progress bar; httpx still sees its size (``fileno``) and sends a length."""

    def __init__(self, f: Any, bar: _Bar) -> None:
        self._f, self._bar = f, bar

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self._bar.add(len(data))
        return data

    def fileno(self) -> int:
        return self._f.fileno()

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def __iter__(self) -> Iterator[bytes]:  # httpx takes a request body that is iterable; it reads it with read()
        return iter(lambda: self.read(CHUNK), b"")


class TarStream:
    """A folder as an uncompressed tar, written by a thread while the upload reads it: no temporary copy.

    Members are named relative to the folder, so the server sees the tree ``clipguard purify`` would
    read from the folder itself (``#split`` picks the same sub-folder). Symlinks are followed, as the
    engine follows them, because the server refuses link members. Only ``read`` is offered, so httpx
    streams the body chunked; memory stays at a few queued blocks whatever the folder's size.
    """

    QUEUED_BLOCKS = 64

    def __init__(self, root: Path, bar: _Bar | None = None) -> None:
        self.root = root
        self._bar = bar
        self._blocks: queue.Queue[bytes | BaseException | None] = queue.Queue(self.QUEUED_BLOCKS)
        self._pending = b""
        self._finished = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def files(root: Path) -> list[Path]:
        return sorted(p for p in root.rglob("*") if p.is_file())

    @classmethod
    def estimate_size(cls, root: Path) -> int:
        """The tar's size for plain members (a 512-byte header and padded content each, two end blocks)."""
        body = sum(512 + -(-p.stat().st_size // 512) * 512 for p in cls.files(root)) + 1024
        return -(-body // tarfile.RECORDSIZE) * tarfile.RECORDSIZE

    def write(self, data: bytes) -> int:  # tarfile's output: handed to the reading side
        while not self._stop.is_set():
            try:
                self._blocks.put(bytes(data), timeout=0.2)
                return len(data)
            except queue.Full:
                continue
        raise OSError("the upload was abandoned")

    def _produce(self) -> None:
        try:
            # GNU format: PAX (the default) adds an extended header to every member for its fractional mtime.
            # (typeshed's file object protocol wants reads and seeks; a "w|" stream only writes)
            with tarfile.open(
                fileobj=self,
                mode="w|",
                dereference=True,  # type: ignore[call-overload]
                format=tarfile.GNU_FORMAT,
            ) as tar:
                for path in self.files(self.root):
                    tar.add(path, arcname=path.relative_to(self.root).as_posix(), recursive=False)
            item: bytes | BaseException | None = None
        except BaseException as exc:
            item = exc
        while not self._stop.is_set():
            try:
                self._blocks.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def read(self, n: int = -1) -> bytes:
        if self._thread is None:
            self._thread = threading.Thread(target=self._produce, name="clipguard-tar", daemon=True)
            self._thread.start()
        while not self._finished and (n < 0 or len(self._pending) < n):
            item = self._blocks.get()
            if item is None:
                self._finished = True
            elif isinstance(item, BaseException):
                self._finished = True
                raise RemoteError(f"{self.root}: could not read the folder ({item})") from item
            else:
                self._pending += item
        size = len(self._pending) if n < 0 else n
        data, self._pending = self._pending[:size], self._pending[size:]
        if self._bar is not None:
            self._bar.add(len(data))
        return data

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


class Client:
    """The service's HTTP API as methods that return typed resources (see ``docs/api.md``).

    ``progress=True`` draws tqdm bars on stderr for uploads, waits and downloads.
    """

    def __init__(
        self,
        server: str,
        api_key: str,
        *,
        timeout: float = 60.0,
        progress: bool = False,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.server = server.rstrip("/")
        self.progress = progress
        self._http = httpx.Client(
            base_url=self.server, timeout=timeout, transport=transport, headers={"Authorization": f"Bearer {api_key}"}
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _call(self, method: str, url: str, *, attempts: int = 1, **kwargs: Any) -> httpx.Response:
        """One request; ``attempts`` > 1 sends it again after a dropped connection (only for idempotent ones)."""
        for attempt in range(1, attempts + 1):
            try:
                response = self._http.request(method, url, **kwargs)
                break
            except httpx.HTTPError as exc:
                if attempt == attempts or not isinstance(exc, httpx.TransportError):
                    raise RemoteError(f"{method} {url}: {type(exc).__name__}: {exc or 'connection failed'}") from exc
                time.sleep(0.5 * attempt)
        _raise_for_problem(method, url, response)
        return response

    def _get(self, url: str, kind: type[R]) -> R:
        return kind.model_validate(self._call("GET", url, attempts=READ_ATTEMPTS).json())

    def _pages(self, url: str, kind: type[R], page_size: int, **params: Any) -> Iterator[R]:
        token: str | None = None
        while True:
            query = _present({**params, "page_size": page_size, "page_token": token})
            page = self._call("GET", url, params=query, attempts=READ_ATTEMPTS).json()
            yield from (kind.model_validate(item) for item in page["items"])
            token = page.get("next_page_token")
            if not token:
                return

    # ---------------------------------------------------------------- models

    def upload_model(
        self,
        weights: str | os.PathLike,
        *,
        arch: str,
        num_classes: int = 10,
        mean: tuple[float, ...] | list[float] | None = None,
        std: tuple[float, ...] | list[float] | None = None,
        name: str | None = None,
    ) -> Model:
        """Register a model, then stream the file with ``PUT …/content`` (the server spools nothing).

        A dropped connection retries the ``PUT`` from the start: the model keeps waiting for its
        content, so no second model is created. The returned model is ``validating``: see
        :meth:`wait_model`.
        """
        path = Path(weights).expanduser()
        if not path.is_file():
            raise RemoteError(f"{path}: no such checkpoint file")
        fields = {"arch": arch, "num_classes": str(num_classes), "name": name or path.name}
        if mean:
            fields["mean"] = ",".join(str(v) for v in mean)
        if std:
            fields["std"] = ",".join(str(v) for v in std)
        model = Model.model_validate(self._call("POST", "/v1/models", data=fields).json())
        url = f"/v1/models/{model.id}/content"
        for attempt in range(1, UPLOAD_ATTEMPTS + 1):
            bar = _Bar(self.progress, path.stat().st_size, f"upload {path.name}")
            try:
                with path.open("rb") as f:
                    response = self._http.put(
                        url, content=_CountedFile(f, bar), headers={"Content-Type": "application/octet-stream"}
                    )
            except httpx.TransportError as exc:
                if attempt == UPLOAD_ATTEMPTS:
                    raise RemoteError(f"PUT {url}: {type(exc).__name__}: {exc}") from exc
                continue
            finally:
                bar.close()
            if response.status_code == 409 and attempt > 1:  # an earlier try landed; its answer was lost
                return self.model(model.id)
            _raise_for_problem("PUT", url, response)
            return Model.model_validate(response.json())
        raise AssertionError("unreachable")

    def model(self, model_id: str) -> Model:
        return self._get(f"/v1/models/{model_id}", Model)

    def models(self, *, status: ModelStatus | None = None, page_size: int = 50) -> Iterator[Model]:
        return self._pages("/v1/models", Model, page_size, status=status)

    def wait_model(self, model_id: str, *, poll_s: float = 0.5, timeout_s: float = 600.0) -> Model:
        """Block until quarantine decides; a rejected checkpoint raises with the server's reason."""
        deadline = time.monotonic() + timeout_s
        while True:
            model = self.model(model_id)
            if model.status == "ready":
                return model
            if model.status == "rejected":
                raise RemoteError(f"model {model_id} rejected: {model.reject_reason}")
            if time.monotonic() > deadline:
                raise RemoteError(f"model {model_id} still {model.status} after {timeout_s:g} s")
            time.sleep(poll_s)

    # ---------------------------------------------------------------- datasets

    def add_dataset(self, ref: str | os.PathLike, *, name: str | None = None) -> Dataset:
        """Every data reference ``clipguard purify --data`` takes, plus two that name data on the server.

        - ``@name``: a dataset the operator registered;
        - ``server:PATH[#split]``: a path under the server's data roots;
        - ``FILE[#split]``: a local ``.npz``, ``.tar``, ``.tar.gz``/``.tgz`` or ``.zip``, uploaded;
        - ``DIR[#split]``: a local folder (ImageFolder, CIFAR-10 batches, …), streamed as a ``.tar``.
        """
        text = os.fspath(ref)
        if text.startswith("@"):
            return self._create_dataset({"registered": text[1:], "name": name})
        if text.startswith("server:"):
            return self._create_dataset({"path": text[len("server:") :], "name": name})
        path, split = parse_reference(text)
        form = {"split": split, "name": name or path.name}
        if path.is_dir():
            try:
                size = TarStream.estimate_size(path)
            except OSError as exc:
                raise RemoteError(f"{path}: could not read the folder ({exc})") from exc
            bar = _Bar(self.progress, size, f"upload {path.name}/")
            stream = TarStream(path, bar)
            try:
                return self._create_dataset(
                    form, files={"file": (f"{path.name or 'data'}.tar", stream, "application/x-tar")}
                )
            finally:
                stream.close()
                bar.close()
        if not path.is_file():
            raise RemoteError(f"data reference not found: {path}")
        if not path.name.lower().endswith(ARCHIVE_SUFFIXES):
            raise RemoteError(
                f"unsupported data reference {path}: expected a folder, .npz, .tar, .tar.gz or .zip "
                "(or @name, server:PATH)"
            )
        bar = _Bar(self.progress, path.stat().st_size, f"upload {path.name}")
        try:
            with path.open("rb") as f:
                return self._create_dataset(form, files={"file": (path.name, _CountedFile(f, bar))})
        finally:
            bar.close()

    def _create_dataset(self, form: dict[str, str | None], files: dict[str, Any] | None = None) -> Dataset:
        return Dataset.model_validate(self._call("POST", "/v1/datasets", data=_present(form), files=files).json())

    def dataset(self, dataset_id: str) -> Dataset:
        return self._get(f"/v1/datasets/{dataset_id}", Dataset)

    def datasets(self, *, page_size: int = 50) -> Iterator[Dataset]:
        return self._pages("/v1/datasets", Dataset, page_size)

    # ---------------------------------------------------------------- jobs

    def submit(
        self,
        model_id: str,
        train_data_id: str,
        *,
        method: Method | str = DEFAULTS.method,
        lam: float | str | None = None,
        granularity: Granularity | str = DEFAULTS.granularity,
        bounds_samples: int | None = None,
        resize: bool = False,
        reactivation_check: bool = False,
        test_data_id: str | None = None,
        attack: str | dict[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> Job:
        """Queue a purification; ``attack`` (a spec or an ``.attack.json`` object) needs ``test_data_id``.

        The request carries an ``Idempotency-Key`` (a new one unless given), so it is sent again once
        after a dropped connection without risk of a second job.
        """
        body: dict[str, Any] = {
            "model_id": model_id,
            "train_data_id": train_data_id,
            "method": method,
            "lam": lam,
            "granularity": granularity,
        }
        if bounds_samples is not None:
            body["bounds_samples"] = bounds_samples
        if resize:  # sent only when asked: an older server knows no such field
            body["resize"] = True
        if reactivation_check:
            body["reactivation_check"] = True
        if test_data_id:
            body["eval"] = {"test_data_id": test_data_id, "attack": attack}
        elif attack:
            raise RemoteError("an attack needs test data to measure it on")
        headers = {"Idempotency-Key": idempotency_key or str(uuid.uuid4())}
        return Job.model_validate(self._call("POST", "/v1/jobs", json=body, headers=headers, attempts=2).json())

    def job(self, job_id: str) -> Job:
        return self._get(f"/v1/jobs/{job_id}", Job)

    def jobs(self, *, state: JobState | None = None, model_id: str | None = None, page_size: int = 50) -> Iterator[Job]:
        """Every job of the tenant, newest first, fetched a page at a time as the iteration goes."""
        return self._pages("/v1/jobs", Job, page_size, state=state, model_id=model_id)

    def cancel(self, job_id: str) -> Job:
        """Cancel a queued job at once, a running one at its next batch; a finished job is a 409 ``ApiError``."""
        return Job.model_validate(self._call("POST", f"/v1/jobs/{job_id}:cancel").json())

    def wait(
        self,
        job_id: str,
        *,
        poll_s: float = 1.0,
        timeout_s: float | None = None,
        on_update: Callable[[Job], None] | None = None,
    ) -> Job:
        """Poll until the job finishes; after ``timeout_s`` a ``RemoteError`` (the job keeps running)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        bar = _Bar(self.progress, 100, "queued", unit="%")
        failing_since: float | None = None
        try:
            while True:
                try:
                    job = self.job(job_id)
                except RemoteError as exc:  # unreachable, or the job store or the rate limit says "later"
                    later = not isinstance(exc, ApiError) or exc.status in (429, 503)
                    failing_since = failing_since or time.monotonic()
                    now = time.monotonic()
                    if not later or now - failing_since > OUTAGE_S or (deadline is not None and now > deadline):
                        raise
                    time.sleep(getattr(exc, "retry_after", None) or poll_s)
                    continue
                failing_since = None
                bar.show(job.stage or job.state, job.percent or 0)
                if on_update is not None:
                    on_update(job)
                if job.done:
                    return job
                if deadline is not None and time.monotonic() > deadline:
                    raise RemoteError(f"job {job_id} still {job.state} after {timeout_s:g} s")
                time.sleep(poll_s)
        finally:
            bar.close()

    def download(self, job: Job | str, out: str | os.PathLike, *, names: list[str] | None = None) -> list[Path]:
        """Fetch the job's artifacts (all, or ``names``) into ``out``, each checked against its sha256.

        A file appears under its name only once complete and verified. S3 storage answers with a
        redirect to a presigned URL; httpx follows it without sending the API key there.
        """
        job = self.job(job) if isinstance(job, str) else job
        if job.state != "succeeded":
            raise RemoteError(f"job {job.id} is {job.state}; only a succeeded job has artifacts")
        wanted = [a for a in job.artifacts if names is None or a.name in names]
        missing = sorted(set(names or ()) - {a.name for a in wanted})
        if missing:
            raise RemoteError(
                f"job {job.id} has no artifact {', '.join(missing)}; it has {', '.join(a.name for a in job.artifacts)}"
            )
        target_dir = Path(out).expanduser()
        target_dir.mkdir(parents=True, exist_ok=True)
        return [self._download_one(artifact, target_dir) for artifact in wanted]

    def _download_one(self, artifact: Artifact, out: Path) -> Path:
        target = out / Path(artifact.name).name
        h = hashlib.sha256()
        bar = _Bar(self.progress, artifact.size, artifact.name)
        try:
            with atomic_path(target) as part:
                with self._http.stream("GET", artifact.url, follow_redirects=True) as response, part.open("wb") as f:
                    if response.is_error:
                        response.read()
                        _raise_for_problem("GET", artifact.url, response)
                    for chunk in response.iter_bytes(CHUNK):
                        h.update(chunk)
                        f.write(chunk)
                        bar.add(len(chunk))
                if h.hexdigest() != artifact.sha256:
                    raise RemoteError(f"{artifact.name}: sha256 mismatch after download")
        except httpx.HTTPError as exc:
            raise RemoteError(f"GET {artifact.url}: {type(exc).__name__}: {exc}") from exc
        finally:
            bar.close()
        return target


def _present(params: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in params.items() if v is not None}


def _raise_for_problem(method: str, url: str, response: httpx.Response) -> None:
    if not response.is_error:
        return
    try:
        problem = response.json()
        if not isinstance(problem, dict):
            raise ValueError
    except ValueError:
        problem = {"detail": response.text.strip()[:200] or response.reason_phrase}
    try:
        retry_after = float(response.headers.get("retry-after", ""))
    except ValueError:
        retry_after = None
    raise ApiError(method, url, response.status_code, problem, retry_after)
